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
cd "$(dirname "$0")/.."
# shellcheck source=deploy/env.sh
source deploy/env.sh
cargo build --release --bins --quiet
learner="$(realpath "$CARGO_TARGET_DIR")/release/flgfn-learner"
cd "$caller"
args=()
fresh=1
for arg in "$@"; do
    case "$arg" in
        --resume) fresh=0 ;;
        --resume-changed) fresh=0; args+=("$arg") ;;
        # Added below once (the learner refuses a repeated flag).
        --fresh) ;;
        *) args+=("$arg") ;;
    esac
done
# FLGFN_RESUME_CHANGED asks the learner for a resume as --resume-changed
# does: any value but clap's false ones ("", 0, f, false, n, no, off).
case "$(printf '%s' "${FLGFN_RESUME_CHANGED:-}" | tr '[:upper:]' '[:lower:]')" in
    "" | 0 | f | false | n | no | off) ;;
    *) fresh=0 ;;
esac
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
