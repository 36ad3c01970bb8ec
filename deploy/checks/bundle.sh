#!/usr/bin/env bash
# Check: the relocatable bundle runs after being moved, with no environment
# variables at all: a short training job (learner + 1 local actor).
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
    echo "bundle: ok: trained 50 steps from a moved bundle with an empty environment"
else
    echo "bundle: FAILED" >&2
    tail -20 "$work/out.log" >&2
    exit 1
fi
