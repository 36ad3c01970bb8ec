#!/usr/bin/env bash
# GPU figures, step 2 of 2, on the GPU machine (PyTorch 2.11 installed, no
# Rust): runs the binaries that deploy/gpu/prepare.sh put in .gpu-bundle/
# and writes what they print under $OUT (or the first argument):
#
#   step-*.md    the per-step cost on the trainer thread: fixed cost
#                (intercept against batch size) and its parts, CUDA (an
#                8-wide and the default network, both of the default's two
#                layers) and CPU (8-wide, two layers), each with its exit
#                status
#   jobs.txt     the default job with K local actors on a CUDA learner:
#                time to quality, trained transitions/s, stale fraction;
#                2 and 14 actors on a CPU learner too, the same machine's
#                baseline (jobs.log: their whole logs, one file, as the
#                device tool returns at most 8)
#   scale.md     the scale benchmark on CUDA: generated and real actors,
#                with and without 25 ms added each way, its exit status and
#                its error lines
#
# Every part is bounded by `timeout` (then killed 5 s later if it is
# still there): 35 s for the checks that come first, then 460 s (35 + 45
# + 20 + 7 x 30 + 150 s), 550 s if every part had to be killed, under the
# 590 s the device call is given (the 10 minutes one command may take
# there, less a margin), so one that hangs costs its own share, not the
# lease. A bundle whose libtorch cannot be found, or a step bench that
# does not run on CUDA, stops the script at once: device time is left
# for another try.
# FLGFN_GPU_DEVICE=cpu runs the same script without a GPU (to try it
# anywhere the bundle's libtorch loads).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
bundle="${FLGFN_GPU_BUNDLE:-$PWD/.gpu-bundle}"
out="${1:-${OUT:-/tmp/flgfn-gpu}}"
device="${FLGFN_GPU_DEVICE:-cuda}"
mkdir -p "$out"
[ -x "$bundle/flgfn-learner" ] || {
    echo "no $bundle/flgfn-learner: run deploy/gpu/prepare.sh first and carry .gpu-bundle" >&2
    exit 1
}

# The binaries were linked against the wheel on the build machine; here
# libtorch comes from the installed PyTorch: the python3 on the PATH's,
# or wherever a torch/lib/libtorch_cuda.so lies in the usual places.
# (Their rpath, searched before LD_LIBRARY_PATH, names the build
# machine's venv: not here, as the cache is not carried.)
torch_lib=$(timeout 20 python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null) || torch_lib=""
if [ -z "$torch_lib" ]; then
    found=$(timeout 10 find /opt /usr/local /usr/lib -name libtorch_cuda.so -path '*/torch/lib/*' 2>/dev/null | head -n 1)
    torch_lib=${found%/*}
fi
[ -n "$torch_lib" ] && export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export FLGFN_ACTOR_BIN="$bundle/flgfn-actor"
export RUST_LOG="${RUST_LOG:-info}"
export NO_COLOR=1 FLGFN_LOG_FORMAT=text

{
    date -u
    timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
    nproc
    echo "device=$device torch_lib=${torch_lib:-not found} LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
    timeout 5 "$bundle/flgfn-learner" --version 2>&1 || true
} | tee "$out/machine.txt"
# Every binary must find its libraries, or every part below fails alike.
missing=$(ldd "$bundle"/* 2>&1 | grep 'not found' | sort -u)
if [ -n "$missing" ]; then
    { echo "libraries not found (torch_lib=${torch_lib:-none}):"; echo "$missing"; } | tee -a "$out/machine.txt" >&2
    exit 1
fi

# 1. What a step costs on the trainer thread (no actors, no network).
# Networks of the default's two layers: on a GPU each layer's calls are
# kernel launches, part of the fixed cost.
for hidden in 8,8 256,256; do
    limit=$([ "$hidden" = 8,8 ] && echo 35 || echo 45)
    file="$out/step-$device-${hidden/,/x}.md"
    timeout -k 5 "$limit" "$bundle/step" --device "$device" --hidden "$hidden" --steps 200 \
        2>&1 | tee "$file"
    echo "rc=${PIPESTATUS[0]}" | tee -a "$file"
    # The whole run is for the GPU: a step bench not on it ends it now.
    if [ "$device" = cuda ] && ! grep -q '^network .* on Cuda' "$file"; then
        echo "the step bench did not run on CUDA (see $file): stopping" | tee -a "$out/machine.txt" >&2
        exit 1
    fi
done
timeout -k 5 20 "$bundle/step" --device cpu --hidden 8,8 --steps 200 2>&1 | tee "$out/step-cpu-8x8.md"
echo "rc=${PIPESTATUS[0]}" | tee -a "$out/step-cpu-8x8.md"

# 2. The default job, as a user runs it, with K local actors; then with
# 14 actors and two larger batch ceilings, which a fixed per-step cost
# favours; then 2 and 14 actors on a CPU learner (a later assignment
# wins in env), the baseline on this machine.
# All logs go to one file: the device tool returns at most 8 files.
: >"$out/jobs.log"
for job in "2" "8" "14" \
    "14 FLGFN_LEARNER__MAX_BATCH_TRANSITIONS=10240" \
    "14 FLGFN_LEARNER__MAX_BATCH_TRANSITIONS=20480" \
    "2 FLGFN_LEARNER__DEVICE=cpu" "14 FLGFN_LEARNER__DEVICE=cpu"; do
    read -r k settings <<<"$job"
    # shellcheck disable=SC2086 # settings is a list of NAME=value words
    env FLGFN_LEARNER__DEVICE="$device" $settings timeout -k 5 30 "$bundle/flgfn-learner" \
        --local-actors --actors "$k" --listen 127.0.0.1:0 --checkpoint-dir "" \
        >"$out/job.log" 2>&1
    rc=$?
    { echo "=== actors=$k${settings:+ $settings} rc=$rc"; cat "$out/job.log"; } >>"$out/jobs.log"
    # The figures of the final line, and trained transitions per second.
    summary=$(grep -o 'training finished.*' "$out/job.log" | tr ' ' '\n' | awk -F= '
        /^(wall_s|time_to_quality_s|marginal_tv|trained_transitions|stale_fraction|weight_bytes_per_trained_transition)=/ {
            v[$1] = $2; printf "%s ", $0 }
        END { if (v["wall_s"] > 0) printf "trained_per_s=%.0f", v["trained_transitions"] / v["wall_s"] }')
    echo "actors=$k ${settings:+$settings }rc=$rc $summary"
done | tee "$out/jobs.txt"
rm -f "$out/job.log"

# 3. Scale figures: generated actors, real actors, and 25 ms each way
# (each delayed row beside its proxied baseline: 2 + 2 rows; 8 real
# actors are in jobs.txt). Rows print as each scenario ends, a delayed
# row's ratios to its baseline with it, so a timeout keeps those done;
# the header, the table and its note are kept, the actors' log lines not.
# What it says on stderr (a panic, a row cut short, failed actors) is
# kept, less the log lines, under the table with its exit status.
timeout -k 5 150 "$bundle/scale" --device "$device" --generated 1,64 --real 2,14 \
    --delay-ms 25 --steps 600 2>"$out/scale.err" | grep --line-buffered -E '^(\||\* |device |$)' |
    tee "$out/scale.md"
rc=${PIPESTATUS[0]}
{
    echo "scale rc=$rc"
    grep -Ev '^[0-9]{4}-[0-9]{2}-[0-9]{2}T' "$out/scale.err" | tail -n 40
} | tee -a "$out/scale.md"
rm -f "$out/scale.err"
# libtorch writes its warnings to stderr itself, once per call (none is
# expected: a flood of them slows every figure above).
grep -h '] Warning: ' "$out"/*.md "$out/jobs.log" | sed -E 's/^\[W[0-9]+ [0-9:.]+ //' |
    sort | uniq -c | sort -rn | head -n 5 | sed 's/^/libtorch warning: /' | tee -a "$out/machine.txt"
echo "done: $out"
