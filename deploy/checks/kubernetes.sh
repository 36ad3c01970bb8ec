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
# The job overlay runs to completion: its learner a Job, nothing that
# restarts a finished one.
kinds="$(grep '^kind:' "$work/job.yaml" | sort | uniq -c | tr -s ' ' | paste -sd, -)"
if [[ "$kinds" != " 1 kind: ConfigMap, 1 kind: Deployment, 1 kind: Job, 1 kind: PersistentVolumeClaim, 1 kind: Service" ]]; then
    echo "kubernetes: the job overlay renders$kinds, not the learner's Job and claim, the actors' Deployment, Service and ConfigMap" >&2
    exit 1
fi
echo "kubernetes: ok: ${overlays[*]} render and validate"
