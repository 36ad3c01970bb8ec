#!/usr/bin/env bash
# The whole test suite: installs libtorch once (cached) and runs every test
# of the workspace in release mode (the same build as the default job, so
# libtorch's C++ glue is compiled once).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=deploy/env.sh
source deploy/env.sh
# Build the binaries first: the launcher test starts the flgfn-actor
# executable, which `cargo test` alone would not rebuild.
cargo build --release --workspace --bins
cargo test --release --workspace "$@"
