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
# added when not given.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=deploy/env.sh
source deploy/env.sh
cargo build --release --bins --quiet
args=("$@")
case " $* " in
    *" --local-actors"*) ;;
    *) args+=(--local-actors) ;;
esac
exec "$CARGO_TARGET_DIR/release/flgfn-learner" "${args[@]}"
