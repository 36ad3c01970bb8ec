#!/usr/bin/env bash
# Check: the sbatch script runs a real job, with `srun` and `scontrol`
# replaced by stand-ins that run each task here (no Slurm on this machine):
# a moved CPU bundle, the learner (component 0) and 2 actor tasks
# (component 1) trained 150 steps, the actors found the learner through
# the address the script passed them and exited 0.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=deploy/tools.sh
source deploy/tools.sh
root="$PWD"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
deploy/bundle.sh --cpu "$work/flgfn-bundle" >/dev/null

mkdir "$work/bin"
cat >"$work/bin/scontrol" <<'SHIM'
#!/usr/bin/env bash
# scontrol show hostnames LIST: every node is this machine.
echo 127.0.0.1
SHIM
cat >"$work/bin/srun" <<'SHIM'
#!/usr/bin/env bash
# srun --het-group=G [options] COMMAND...: runs the group's tasks here, with
# SLURM_PROCID set, and waits for them all.
set -euo pipefail
group=0
while [[ "${1:-}" == --* ]]; do
    case "$1" in
        --het-group=*) group="${1#--het-group=}" ;;
    esac
    shift
done
var="SLURM_NTASKS_HET_GROUP_$group"
tasks="${!var}"
pids=()
for ((rank = 0; rank < tasks; rank++)); do
    SLURM_PROCID="$rank" "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
SHIM
chmod +x "$work/bin/scontrol" "$work/bin/srun"
cat >"$work/job.toml" <<'JOB'
[task]
name = "set_generation"
size = "small"

[learner]
max_steps = 150
JOB

port="$(free_port)"
cd "$work"
if env -i PATH="$work/bin:/usr/bin:/bin" HOME="$work" \
    SLURM_SUBMIT_DIR="$work" SLURM_JOB_ID=4242 \
    SLURM_JOB_NODELIST_HET_GROUP_0=gpu-node-1 \
    SLURM_NTASKS_HET_GROUP_0=1 SLURM_NTASKS_HET_GROUP_1=2 \
    SLURM_CPUS_PER_TASK_HET_GROUP_0=1 \
    FLGFN_JOB="$work/job.toml" FLGFN_PORT="$port" \
    timeout 600 bash "$root/deploy/slurm/flgfn.sbatch" >"$work/job.log" 2>&1 &&
    grep -q "training finished" "$work/job.log" &&
    [ "$(grep -c "the learner finished training" "$work/job.log")" -eq 2 ] &&
    grep -q "actor-1" "$work/job.log" &&
    [ -s "$work/flgfn-state-4242/metrics.jsonl" ] &&
    ls "$work/flgfn-state-4242/checkpoints/"* >/dev/null; then
    echo "slurm: ok: the sbatch script trained 150 steps with 2 actor tasks (srun and scontrol stood in for)"
else
    echo "slurm: FAILED" >&2
    tail -30 "$work/job.log" >&2
    exit 1
fi
