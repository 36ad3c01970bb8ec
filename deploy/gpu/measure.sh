#!/usr/bin/env bash
# GPU figures, step 2 of 2, on the GPU machine (PyTorch 2.11 installed, no
# Rust): runs the binaries that deploy/gpu/prepare.sh put in .gpu-bundle/
# and writes what they print under $OUT (or the first argument):
#
#   step-*.md    the per-step cost on the trainer thread: fixed cost
#                (intercept against batch size) and its parts, CUDA and CPU
#   jobs.txt     the default job with K local actors on a CUDA learner:
#                time to quality, trained transitions/s, stale fraction
#                (jobs.log: their whole logs, one file, as the device
#                tool returns at most 8)
#   scale.md     the scale benchmark on CUDA: generated and real actors,
#                with and without 25 ms added each way
#
# Every part is bounded by `timeout` (then killed 5 s later if it is
# still there): 525 s in all (40 + 50 + 25 + 6 x 35 + 200 s), 575 s if
# every part had to be killed, under the 590 s the device call is given
# (the 10 minutes one command may take there, less a margin), so one that
# hangs costs its own share, not the lease.
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
# libtorch comes from the installed PyTorch.
if torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null); then
    export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
export FLGFN_ACTOR_BIN="$bundle/flgfn-actor"
export RUST_LOG="${RUST_LOG:-info}"
# Reports (each an evaluation, left out of the training time) every 0.05 s
# early on, so that a time to quality near the 0.3 s target is resolved
# (the default first report is at 0.25 s).
export FLGFN_LEARNER__FIRST_REPORT_S="${FLGFN_LEARNER__FIRST_REPORT_S:-0.05}"
export NO_COLOR=1 FLGFN_LOG_FORMAT=text

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
    nproc
    echo "device=$device LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
    "$bundle/flgfn-learner" --version 2>&1 || true
} | tee "$out/machine.txt"

# 1. What a step costs on the trainer thread (no actors, no network).
for hidden in 8 256,256; do
    limit=$([ "$hidden" = 8 ] && echo 40 || echo 50)
    timeout -k 5 "$limit" "$bundle/step" --device "$device" --hidden "$hidden" --steps 200 \
        2>&1 | tee "$out/step-$device-${hidden/,/x}.md"
done
timeout -k 5 25 "$bundle/step" --device cpu --hidden 8 --steps 200 2>&1 | tee "$out/step-cpu-8.md"

# 2. The default job, as a user runs it, with K local actors; then with
# 14 actors and two larger batch ceilings, which a fixed per-step cost
# favours.
# All logs go to one file: the device tool returns at most 8 files.
: >"$out/jobs.log"
for job in "2" "4" "8" "14" \
    "14 FLGFN_LEARNER__MAX_BATCH_TRANSITIONS=10240" \
    "14 FLGFN_LEARNER__MAX_BATCH_TRANSITIONS=20480"; do
    read -r k settings <<<"$job"
    # shellcheck disable=SC2086 # settings is a list of NAME=value words
    env FLGFN_LEARNER__DEVICE="$device" $settings timeout -k 5 35 "$bundle/flgfn-learner" \
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
timeout -k 5 200 "$bundle/scale" --device "$device" --generated 1,16,64 --real 2,14 \
    --delay-ms 25 --steps 600 2>/dev/null | grep --line-buffered -E '^(\||\* |device |$)' |
    tee "$out/scale.md"
echo "done: $out"
