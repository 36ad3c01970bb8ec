#!/usr/bin/env bash
# Check: the relocatable bundles run after being moved, with no environment
# variables at all: a short training job (learner + 1 local actor) from the
# CPU bundle, and from the CUDA bundle too (on this machine's CPU: no GPU
# here, so what it checks is that its libraries, the CUDA ones included,
# load from the moved folder).
set -euo pipefail
cd "$(dirname "$0")/../.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
deploy/bundle.sh --cpu "$work/built" >/dev/null
mv "$work/built" "$work/moved"
cd "$work"
# Bounded: a learner that hangs fails the check instead of the whole run.
if timeout 300 env -i "$work/moved/bin/flgfn-learner" --listen 127.0.0.1:0 --local-actors --actors 1 \
    --max-steps 50 --checkpoint-dir "" >"$work/out.log" 2>&1 &&
    grep -Eq "training finished steps=50 " "$work/out.log"; then
    echo "bundle: ok: trained 50 steps from a moved CPU bundle with an empty environment"
else
    echo "bundle: FAILED" >&2
    tail -20 "$work/out.log" >&2
    exit 1
fi
rm -rf "$work/moved"
deploy_dir="$OLDPWD"
(cd "$deploy_dir" && deploy/bundle.sh --cuda "$work/cuda-built" >/dev/null)
mv "$work/cuda-built" "$work/cuda-moved"
missing="$(env -i ldd "$work/cuda-moved/bin/flgfn-learner" | grep 'not found' || true)"
if [ -n "$missing" ]; then
    echo "bundle: FAILED: the moved CUDA bundle's learner misses libraries:" >&2
    echo "$missing" >&2
    exit 1
fi
if timeout 300 env -i "$work/cuda-moved/bin/flgfn-learner" --listen 127.0.0.1:0 --local-actors --actors 1 \
    --max-steps 20 --checkpoint-dir "" >"$work/cuda.log" 2>&1 &&
    grep -Eq "training finished steps=20 " "$work/cuda.log"; then
    echo "bundle: ok: trained 20 steps from a moved CUDA bundle with an empty environment (on the CPU: no GPU here)"
else
    echo "bundle: FAILED (CUDA bundle)" >&2
    tail -20 "$work/cuda.log" >&2
    exit 1
fi
