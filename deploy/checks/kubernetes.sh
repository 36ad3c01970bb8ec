#!/usr/bin/env bash
# Check: every kustomize overlay under deploy/k8s/overlays renders with
# `kubectl kustomize` and validates, strictly (no unknown fields), against
# the Kubernetes schemas bundled in kubernetes-validate (offline). Skipped
# (exit 77) where kubectl is not installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v kubectl >/dev/null; then
    echo "kubernetes: skipped: kubectl not installed (needed for kubectl kustomize)"
    exit 77
fi
# shellcheck source=deploy/tools.sh
source deploy/tools.sh
tools="$(lint_tools)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
overlays=()
for overlay in deploy/k8s/overlays/*/; do
    name="$(basename "$overlay")"
    kubectl kustomize "$overlay" >"$work/$name.yaml"
    "$tools/kubernetes-validate" --strict --quiet "$work/$name.yaml"
    overlays+=("$name ($(grep -c '^kind:' "$work/$name.yaml") resources)")
done
echo "kubernetes: ok: ${overlays[*]} render and validate"
