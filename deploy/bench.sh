#!/usr/bin/env bash
# Scale figures: the learner against generated and real actors, with and
# without added network delay (learner/benches/scale.rs). Prints a table;
# asserts nothing. Every argument goes to the benchmark (see --help), e.g.
#
#   deploy/bench.sh --generated 1,16,64 --real 1,2 --delay-ms 25 --steps 600
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=deploy/env.sh
source deploy/env.sh
# Real actors are separate processes: build the binaries first.
cargo build --release --bins --quiet
cargo bench --quiet -p flgfn-learner --bench scale -- "$@"
