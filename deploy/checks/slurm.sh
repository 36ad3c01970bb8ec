#!/usr/bin/env bash
# Check: the sbatch script runs a real job, with `srun` and `scontrol`
# replaced by stand-ins that run each task here (no Slurm on this machine):
# a moved CPU bundle, the learner (component 0) and 2 actor tasks
# (component 1) trained 150 steps, the actors found the learner through
# the address the script passed them and exited 0; a job whose actor step
# fails at once stops its learner gracefully and fails; the learner's step
# gets its component's CPUs, and threads from them; a job whose
# configuration turns TLS on, or that the learner refuses, or with no
# bundle where it looks, fails before anything starts; a token file in the job file is used, not replaced.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=deploy/tools.sh
source deploy/tools.sh
# (Run alone too: the learners here read the caller's FLGFN_* otherwise.)
ignore_caller_settings
root="$PWD"
work="$(mktemp -d)"
# The processes running from this check's bundle, by their command lines
# (read from /proc: procps' pgrep is missing from slim images).
bundle_processes() {
    local dir cmdline
    for dir in /proc/[0-9]*; do
        cmdline="$(tr '\0' ' ' <"$dir/cmdline" 2>/dev/null)" || continue
        if [[ $cmdline == *"$work/flgfn-bundle/bin/"* ]]; then
            echo "${dir#/proc/}"
        fi
    done
}
# Whatever still runs from this bundle (the tasks of a job that timed out
# outlive its shell, and would write into $work) stops before it goes.
cleanup() {
    local pids
    mapfile -t pids < <(bundle_processes)
    if [ "${#pids[@]}" -gt 0 ]; then
        kill "${pids[@]}" 2>/dev/null || true
    fi
    for _ in $(seq 50); do
        [ -z "$(bundle_processes)" ] && break
        sleep 0.2
    done
    rm -rf "$work"
}
trap cleanup EXIT
deploy/bundle.sh --cpu "$work/flgfn-bundle" >/dev/null

mkdir "$work/bin"
cat >"$work/bin/scontrol" <<'SHIM'
#!/usr/bin/env bash
# scontrol show hostnames LIST: the learner's node (component 0's list, as
# sbatch_here below sets it) is this machine; any other list is an error,
# so a script that reads the wrong one fails here.
if [ "$*" = "show hostnames gpu-node-1" ]; then
    echo 127.0.0.1
else
    echo "scontrol (check stand-in): unexpected: $*" >&2
    exit 1
fi
SHIM
# (Python: the script starts srun in the background, where a shell without
# job control ignores SIGINT, and bash cannot trap a signal ignored on entry.)
{
    # (By a link without spaces: the kernel cuts a shebang at the first.)
    ln -s "$(python3 -c 'import sys; print(sys.executable)')" "$work/bin/srun-python"
    echo "#!$work/bin/srun-python"
    cat <<'SHIM'
"""srun --het-group=G [options] COMMAND...: runs the group's tasks here,
with SLURM_PROCID set, and waits for them all. Signals as the real srun
takes them: SIGTERM or SIGHUP kill the tasks ("forcing job termination"),
and SIGINT reaches them only with --disable-status."""
import os
import signal
import subprocess
import sys

args = sys.argv[1:]
# Each step's command line, for the check to read.
with open(os.environ["FLGFN_CHECK_SRUN_LOG"], "a", encoding="utf-8") as record:
    print(" ".join(args), file=record)
group, disable_status = "0", False
while args and args[0].startswith("--"):
    option = args.pop(0)
    if option.startswith("--het-group="):
        group = option.split("=", 1)[1]
    elif option == "--disable-status":
        disable_status = True
# FLGFN_CHECK_FAILING_GROUP=G: that group's step fails at once, as one
# whose bundle the nodes cannot see.
if os.environ.get("FLGFN_CHECK_FAILING_GROUP") == group:
    print("srun: error: the step cannot start (check stand-in)", file=sys.stderr)
    sys.exit(2)
tasks = [
    subprocess.Popen(args, env={**os.environ, "SLURM_PROCID": str(rank)})
    for rank in range(int(os.environ[f"SLURM_NTASKS_HET_GROUP_{group}"]))
]


def to_tasks(signum):
    for task in tasks:
        if task.poll() is None:
            task.send_signal(signum)


def on_signal(signum, _frame):
    if signum == signal.SIGINT:
        if disable_status:
            print("srun: sending Ctrl-C to the step", file=sys.stderr)
            to_tasks(signal.SIGINT)
        else:
            print("srun: interrupt (one more within 1 sec to abort)", file=sys.stderr)
    else:
        print("srun: forcing job termination", file=sys.stderr)
        to_tasks(signal.SIGKILL)


for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(signum, on_signal)
codes = [task.wait() for task in tasks]
failed = [code if code > 0 else 128 - code for code in codes if code != 0]
sys.exit(failed[-1] if failed else 0)
SHIM
} >"$work/bin/srun"
chmod +x "$work/bin/scontrol" "$work/bin/srun"
cat >"$work/job.toml" <<'JOB'
[task]
name = "set_generation"
size = "small"

[learner]
max_steps = 150
JOB
# The same job with its token in a file (which the script keeps, where
# without one it makes a fresh token).
(umask 077; od -An -N24 -tx1 /dev/urandom | tr -d ' \n' >"$work/token")
{ cat "$work/job.toml"; printf '\n[auth]\ntoken_file = "%s"\n' "$work/token"; } >"$work/job-token.toml"

port="$(free_port)"
cd "$work"
# The job's environment as Slurm sets it, plus this check's settings:
# sbatch_here JOB_ID [NAME=VALUE...]. The learner trains on the CPU here
# (the script asks for CUDA unless told otherwise).
sbatch_here() {
    env -i PATH="$work/bin:/usr/bin:/bin" HOME="$work" FLGFN_LEARNER__DEVICE=cpu \
        SLURM_SUBMIT_DIR="$work" SLURM_JOB_ID="$1" \
        SLURM_JOB_NODELIST_HET_GROUP_0=gpu-node-1 \
        SLURM_JOB_NODELIST_HET_GROUP_1=cpu-node-[1-2] \
        SLURM_NTASKS_HET_GROUP_0=1 SLURM_NTASKS_HET_GROUP_1=2 \
        SLURM_CPUS_PER_TASK_HET_GROUP_0=1 \
        FLGFN_JOB="$work/job.toml" FLGFN_PORT="$port" \
        FLGFN_CHECK_SRUN_LOG="$work/srun-$1.log" "${@:2}" \
        timeout 600 bash "$root/deploy/slurm/flgfn.sbatch"
}

# Another job's learner on the port: this job stops, saying so, rather
# than start its actors against it.
"$work/flgfn-bundle/bin/flgfn-learner" --config "$work/job.toml" --listen "127.0.0.1:$port" \
    --checkpoint-dir "" >"$work/other.log" 2>&1 &
other=$!
until "$work/flgfn-bundle/bin/flgfn-health" --address "http://127.0.0.1:$port" >/dev/null 2>&1; do
    kill -0 "$other" 2>/dev/null || { echo "slurm: FAILED: the other learner did not start" >&2; cat "$work/other.log" >&2; exit 1; }
    sleep 0.2
done
if sbatch_here 4241 >"$work/taken.log" 2>&1 || ! grep -q "already serves" "$work/taken.log"; then
    echo "slurm: FAILED: a job started on a port another learner serves" >&2
    cat "$work/taken.log" >&2
    exit 1
fi
kill "$other"
wait "$other" || true

# A learner node without a GPU fails the job, by default, rather than
# train on its CPU (an empty value is the script's default, cuda).
if sbatch_here 4239 FLGFN_LEARNER__DEVICE= >"$work/no-gpu.log" 2>&1 ||
    ! grep -q "sees no CUDA device" "$work/no-gpu.log" ||
    ! grep -q "the learner exited before serving" "$work/no-gpu.log"; then
    echo "slurm: FAILED: a job whose learner node has no GPU did not fail saying so" >&2
    cat "$work/no-gpu.log" >&2
    exit 1
fi

# The actor step fails at once: the job stops its learner, gracefully
# (through srun, which would kill it on SIGTERM), and fails, instead of
# holding the allocation until its time limit.
# (With 6 CPUs for the learner: its step gets them, and 6 - 4 threads.
# And an address of the job's own beyond loopback, with no token: the
# script listens where it says, with the fresh token it makes.)
if sbatch_here 4240 FLGFN_CHECK_FAILING_GROUP=1 FLGFN_ACTORS_GONE_GRACE_S=2 \
    SLURM_CPUS_PER_TASK_HET_GROUP_0=6 FLGFN_LEARNER__LISTEN="0.0.0.0:$port" >"$work/failed.log" 2>&1 ||
    ! grep -q "the actor step failed (status 2)" "$work/failed.log" ||
    ! grep -q "shutdown requested" "$work/failed.log" ||
    ! grep -q "flgfn: a fresh token for this job" "$work/failed.log" ||
    grep -q "forcing job termination" "$work/failed.log" ||
    pgrep -f "$work/flgfn-bundle/bin/flgfn-learner" >/dev/null; then
    echo "slurm: FAILED: a job whose actor step failed did not stop its learner and fail" >&2
    cat "$work/failed.log" >&2
    exit 1
fi
if ! grep -q -- "--het-group=0 --ntasks=1 --cpus-per-task=6 .*/flgfn-learner .*--threads 2 " "$work/srun-4240.log"; then
    echo "slurm: FAILED: the learner's step did not get its 6 CPUs and 2 threads" >&2
    cat "$work/srun-4240.log" >&2
    exit 1
fi

# TLS on (here by variables; a job file's [tls] alike): refused before
# any step starts, rather than health checks over plain text until the
# time limit. A configuration the learner refuses fails alike, with its
# error.
# (Needs openssl for the certificate: without it, this part alone is
# skipped, saying so.)
tls_refused="a TLS job and "
if ! command -v openssl >/dev/null; then
    echo "slurm: the TLS refusal is not checked: openssl is not installed"
    tls_refused=""
else
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
        -subj /CN=localhost -keyout "$work/key.pem" -out "$work/cert.pem" 2>"$work/openssl.log" ||
        { cat "$work/openssl.log" >&2; exit 1; }
    if sbatch_here 4243 FLGFN_TLS__CERT_FILE="$work/cert.pem" FLGFN_TLS__KEY_FILE="$work/key.pem" \
        >"$work/tls.log" 2>&1 ||
        ! grep -q "the job turns TLS on (tls.cert_file)" "$work/tls.log" ||
        [ -e "$work/srun-4243.log" ]; then
        echo "slurm: FAILED: a job with TLS on was not refused before its steps" >&2
        cat "$work/tls.log" >&2
        exit 1
    fi
fi
# A bundle that is not there is said to be missing, not blamed on the
# job's configuration.
if sbatch_here 4245 FLGFN_BUNDLE_DIR="$work/no-bundle" >"$work/no-bundle.log" 2>&1 ||
    ! grep -q "no bundle at $work/no-bundle (its bin/flgfn-learner is missing)" "$work/no-bundle.log" ||
    grep -q "refuses this job's configuration" "$work/no-bundle.log"; then
    echo "slurm: FAILED: a job with no bundle did not say the bundle was missing" >&2
    cat "$work/no-bundle.log" >&2
    exit 1
fi
if sbatch_here 4244 FLGFN_LEARNER__MAX_STEPS=-1 >"$work/refused.log" 2>&1 ||
    ! grep -q "the learner refuses this job's configuration" "$work/refused.log" ||
    ! grep -q "learner.max_steps" "$work/refused.log" ||
    [ -e "$work/srun-4244.log" ]; then
    echo "slurm: FAILED: a job whose configuration the learner refuses did not fail before its steps, naming the key" >&2
    cat "$work/refused.log" >&2
    exit 1
fi

# (An empty FLGFN_LEARNER__THREADS means the default, for actors too.)
if sbatch_here 4242 FLGFN_LEARNER__THREADS= FLGFN_JOB="$work/job-token.toml" >"$work/job.log" 2>&1 &&
    grep -q "flgfn: token from auth.token_file" "$work/job.log" &&
    grep -Eq "training finished steps=150 " "$work/job.log" &&
    [ "$(grep -c "the learner ended training" "$work/job.log")" -eq 2 ] &&
    grep -q "actor-1" "$work/job.log" &&
    [ -s "$work/flgfn-state-4242/metrics.jsonl" ] &&
    ls "$work/flgfn-state-4242/checkpoints/"* >/dev/null; then
    echo "slurm: ok: the sbatch script trained 150 steps with 2 actor tasks (srun and scontrol stood in for) on the job file's token file, refused a port another learner served, failed on a learner node without a GPU, stopped its learner gracefully when the actor step failed (its step given 6 CPUs and 2 threads), and refused ${tls_refused}a refused configuration and a missing bundle before any step"
else
    echo "slurm: FAILED" >&2
    tail -30 "$work/job.log" >&2
    exit 1
fi
