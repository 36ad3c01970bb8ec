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

# moved_bundle_trains FLAVOUR STEPS: builds that bundle, moves it, checks
# that its learner finds every library in an empty environment, and trains
# STEPS steps from it (run from the scratch folder, as from anywhere).
moved_bundle_trains() {
    local flavour="$1" steps="$2" moved="$work/$1-moved" missing
    deploy/bundle.sh "--$flavour" "$work/$flavour-built" >/dev/null
    mv "$work/$flavour-built" "$moved"
    local linked
    # (ldd's own failure is one, not an empty list of missing libraries.)
    linked="$(env -i ldd "$moved/bin/flgfn-learner")" || {
        echo "bundle: FAILED: ldd cannot read the moved $flavour bundle's learner" >&2
        return 1
    }
    missing="$(grep 'not found' <<<"$linked" || true)"
    if [ -n "$missing" ]; then
        echo "bundle: FAILED: the moved $flavour bundle's learner misses libraries:" >&2
        echo "$missing" >&2
        return 1
    fi
    # Bounded: a learner that hangs fails the check instead of the whole run.
    if ! (cd "$work" && timeout 300 env -i "$moved/bin/flgfn-learner" --listen 127.0.0.1:0 \
        --local-actors --actors 1 --max-steps "$steps" --checkpoint-dir "" \
        >"$work/$flavour.log" 2>&1) ||
        ! grep -Eq "training finished steps=$steps " "$work/$flavour.log"; then
        echo "bundle: FAILED ($flavour bundle)" >&2
        tail -20 "$work/$flavour.log" >&2
        return 1
    fi
    rm -rf "$moved"
}

moved_bundle_trains cpu 50
echo "bundle: ok: trained 50 steps from a moved CPU bundle with an empty environment"
moved_bundle_trains cuda 20
echo "bundle: ok: trained 20 steps from a moved CUDA bundle with an empty environment (on the CPU: no GPU here)"
