#!/usr/bin/env bash
# The whole test suite: installs libtorch once (cached) and runs every test
# of the workspace in release mode (the same build as the default job, so
# libtorch's C++ glue is compiled once), then the deployment checks
# (deploy/checks/*.sh: the moved bundle, the compose test with real
# containers, manifests and linters). Ends with two summary lines,
# "tests: N passed, N failed" (every test binary runs, even after a
# failure) and "checks: N passed, N failed, N skipped" (a check exits 77
# to skip, printing why).
#
#   deploy/test.sh          # the suite (CI runs this)
#   deploy/test.sh --long   # also a 10-minute soak and 100,000 fuzz cases
#                           # from a new seed (printed; FLGFN_FUZZ_SEED=N
#                           # replays one)
set -euo pipefail
args=()
for arg in "$@"; do
    if [ "$arg" = "--long" ]; then
        export FLGFN_SOAK_S="${FLGFN_SOAK_S:-600}"
        export FLGFN_FUZZ_CASES="${FLGFN_FUZZ_CASES:-100000}"
        export FLGFN_FUZZ_SEED="${FLGFN_FUZZ_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}"
        echo "long run: FLGFN_SOAK_S=$FLGFN_SOAK_S FLGFN_FUZZ_CASES=$FLGFN_FUZZ_CASES FLGFN_FUZZ_SEED=$FLGFN_FUZZ_SEED"
    else
        args+=("$arg")
    fi
done
cd "$(dirname "$0")/.."
# shellcheck source=deploy/tools.sh
source deploy/tools.sh
ignore_caller_settings
# One suite at a time per cache: its venvs are installed, and its binaries
# built and then run by the checks, at fixed paths (two checkouts' runs
# would test each other's builds).
mkdir -p "$FLGFN_CACHE_DIR"
exec 9>"$FLGFN_CACHE_DIR/.test-suite.lock"
# (Held by this shell alone: what it starts gets no copy of the lock's
# descriptor, `9>&-`, so a daemon a build leaves running, sccache's say,
# cannot hold it.)
if command -v flock >/dev/null && ! flock -n 9; then
    echo "flgfn: another test run holds $FLGFN_CACHE_DIR; waiting for it to finish" >&2
    flock -w 3600 9 || {
        echo "flgfn: $FLGFN_CACHE_DIR/.test-suite.lock still held after an hour (fuser -v shows by whom)" >&2
        exit 1
    }
fi
# shellcheck source=deploy/env.sh
source deploy/env.sh
# Build the binaries first: the launcher test starts the flgfn-actor
# executable, which `cargo test` alone would not rebuild.
cargo build --release --workspace --bins 9>&-
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
cargo test --release --workspace --no-fail-fast ${args[@]+"${args[@]}"} 2>&1 9>&- | tee "$log" || status=$?
# cargo prints one "test result:" line per test binary (the last is often a
# doc-test run with 0 tests): add them up so the total is what closes.
summary="$(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed", p, f }' "$log")"
# A test binary that crashed, or did not build, prints no result line.
if [ "$status" -ne 0 ] && [[ $summary == *", 0 failed" ]]; then
    summary="$summary, but cargo test exited $status (a test binary that crashed or did not build reports no result: see above)"
fi
# A filtered run (arguments for cargo test) runs no deployment checks.
passed=0 failed=0 skipped=0
if [ "${#args[@]}" -eq 0 ]; then
    for check in deploy/checks/*.sh; do
        echo "== $check"
        check_status=0
        "$check" 9>&- || check_status=$?
        case "$check_status" in
            0) passed=$((passed + 1)) ;;
            77) skipped=$((skipped + 1)) ;;
            *) failed=$((failed + 1)); status=1; echo "$check: FAILED (exit $check_status)" ;;
        esac
    done
fi
echo "$summary"
echo "checks: $passed passed, $failed failed, $skipped skipped"
exit "$status"
