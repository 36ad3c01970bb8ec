#!/usr/bin/env bash
# The default job: installs libtorch once (cached), builds in release mode,
# and runs a learner with local actor processes on the embedded default
# configuration (FL-DB, small set-generation task, 2 actors).
#
#   deploy/local.sh                          # the default job
#   deploy/local.sh --actors 4               # more actors
#   deploy/local.sh --config my.toml --metrics run.jsonl --max-steps 5000
#
# Every argument goes to flgfn-learner (see `--help`); --local-actors is
# added when not given, and --fresh unless --resume (or --resume-changed,
# which resumes with changed settings) is given: the default job starts
# over each time (its checkpoints and final weights land in ./checkpoints,
# under the directory it is called from), while `deploy/local.sh --resume`
# continues the last run.
set -euo pipefail
# Paths given (--config, --metrics, --checkpoint-dir) and ./checkpoints are
# the caller's: the learner runs where this script was called from.
caller="$PWD"
fresh=1
# FLGFN_RESUME_CHANGED asks the learner for a resume as --resume-changed
# does; it takes the values the learner takes, and anything else is
# refused before the build (the learner would refuse it after --fresh was
# dropped).
case "$(printf '%s' "${FLGFN_RESUME_CHANGED:-}" | tr '[:upper:]' '[:lower:]')" in
    "" | 0 | f | false | n | no | off) ;;
    1 | t | true | y | yes | on) fresh=0 ;;
    *)
        echo "local.sh: FLGFN_RESUME_CHANGED=$FLGFN_RESUME_CHANGED: takes 1, true, yes, on, y or t, or 0, false, no, off, n, f or nothing" >&2
        exit 2
        ;;
esac
cd "$(dirname "$0")/.."
# shellcheck source=deploy/env.sh
source deploy/env.sh
cargo build --release --bins --quiet
learner="$(realpath "$CARGO_TARGET_DIR")/release/flgfn-learner"
cd "$caller"
args=()
for arg in "$@"; do
    case "$arg" in
        --resume) fresh=0 ;;
        --resume-changed) fresh=0; args+=("$arg") ;;
        # Added below once (the learner refuses a repeated flag).
        --fresh) ;;
        *) args+=("$arg") ;;
    esac
done
case " $* " in
    *" --local-actors"*) ;;
    *) args+=(--local-actors) ;;
esac
if [ "$fresh" = 0 ] && [[ " $* " == *" --fresh "* ]]; then
    echo "local.sh: --fresh and --resume (or --resume-changed, or FLGFN_RESUME_CHANGED) contradict each other: give one" >&2
    exit 2
fi
if [ "$fresh" = 1 ]; then args+=(--fresh); fi
exec "$learner" "${args[@]}"
