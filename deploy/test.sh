#!/usr/bin/env bash
# The whole test suite: installs libtorch once (cached) and runs every test
# of the workspace in release mode (the same build as the default job, so
# libtorch's C++ glue is compiled once).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=deploy/env.sh
source deploy/env.sh
cargo test --release --workspace "$@"
