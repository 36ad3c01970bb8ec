#!/usr/bin/env bash
# Check: the names in the manifests, compose file, Dockerfile and sbatch
# script (flags, FLGFN_ variables, config keys, ports) are ones the
# binaries accept (see names.py). Uses the release binaries test.sh built.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=deploy/env.sh
source deploy/env.sh >/dev/null
# shellcheck source=deploy/tools.sh
source deploy/tools.sh
tools="$(lint_tools)"
cargo build --release --quiet --bin flgfn-learner --bin flgfn-actor --bin flgfn-health
"$tools/python" deploy/checks/names.py "$CARGO_TARGET_DIR/release"
