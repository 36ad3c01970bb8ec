#!/usr/bin/env bash
# Memory figures: the learner's resident memory, alone in its process,
# against K generated actors (flgfn-loadgen, another process) for each K
# given, e.g.
#
#   deploy/bench_memory.sh 1 16 64 256      # the default
#   deploy/bench_memory.sh --envs 16 1 64    # 16 trajectories per chunk
#
# Each row trains the default job for 20 s (or FLGFN_BENCH_SECONDS) and
# prints the learner's RSS before any actor, its peak (sampled every
# 0.2 s), and its mean over the second half, in MiB (2^20 bytes; the
# scale bench's MB are 10^6). Asserts nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=deploy/env.sh
source deploy/env.sh
# shellcheck source=deploy/tools.sh
source deploy/tools.sh
cargo build --release --bins --quiet
bin="$CARGO_TARGET_DIR/release"
seconds="${FLGFN_BENCH_SECONDS:-20}"
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -lt 1 ]; then
    echo "bench_memory.sh: FLGFN_BENCH_SECONDS must be a whole number of seconds, at least 1 (got $seconds)" >&2
    exit 2
fi
# Read above: the caller's other settings (a FLGFN_CONFIG, a RUST_LOG that
# hides the "actor joined" lines counted below) would change the rows.
ignore_caller_settings
samples=$((seconds * 5))
# The generated actors' trajectories per chunk (default: actor.envs = 0).
envs_flag=()
if [ "${1:-}" = "--envs" ]; then
    if ! [[ "${2:-}" =~ ^[0-9]+$ ]]; then
        echo "bench_memory.sh: --envs takes a number of trajectories per chunk (got '${2:-}')" >&2
        exit 2
    fi
    envs_flag=(--envs "$2")
    shift 2
fi
counts=("$@")
[ "${#counts[@]}" -gt 0 ] || counts=(1 16 64 256)
rss_kb() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }

pids=()
log="$(mktemp)"
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -f "$log"' EXIT
echo "| generated actors | sessions | learner RSS before actors MiB | peak MiB | mean of 2nd half MiB |"
echo "|---|---|---|---|---|"
for k in "${counts[@]}"; do
    port="$(free_port)"
    "$bin/flgfn-learner" --listen "127.0.0.1:$port" --checkpoint-dir "" --max-steps 100000000 \
        >"$log" 2>&1 &
    learner=$!
    pids=("$learner")
    # (A learner that runs but never serves ends the script within 60 s.)
    waited=0
    until "$bin/flgfn-health" --address "http://127.0.0.1:$port" >/dev/null 2>&1; do
        kill -0 "$learner" 2>/dev/null || { cat "$log" >&2; exit 1; }
        waited=$((waited + 1))
        if [ "$waited" -gt 300 ]; then
            echo "bench_memory.sh: the learner did not serve within 60 s; its log:" >&2
            cat "$log" >&2
            exit 1
        fi
        sleep 0.2
    done
    before="$(rss_kb "$learner")"
    "$bin/flgfn-loadgen" --learner "http://127.0.0.1:$port" --actors "$k" ${envs_flag[@]+"${envs_flag[@]}"} >/dev/null 2>&1 &
    pids+=("$!")
    peak=0 sum=0 n=0
    for ((i = 1; i <= samples; i++)); do
        sleep 0.2
        if ! rss="$(rss_kb "$learner" 2>/dev/null)" || [ -z "$rss" ]; then
            echo "bench_memory.sh: the learner exited during the row of $k actors; its log:" >&2
            cat "$log" >&2
            exit 1
        fi
        ((rss > peak)) && peak=$rss
        if ((i > samples / 2)); then
            sum=$((sum + rss)) n=$((n + 1))
        fi
    done
    sessions="$(grep -c "actor joined" "$log" || true)"
    # (Either may have exited already: the row is still printed.)
    kill "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
    pids=()
    echo "| $k | $sessions | $((before / 1024)) | $((peak / 1024)) | $((sum / n / 1024)) |"
done
