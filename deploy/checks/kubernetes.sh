#!/usr/bin/env bash
# Check: every kustomize overlay under deploy/k8s/overlays renders with
# `kubectl kustomize` and validates, strictly (no unknown fields), against
# the Kubernetes schemas bundled in kubernetes-validate (offline), as does
# every plain manifest beside them (deploy/k8s/*.yaml); the results pod
# mounts the job overlay's claim, by its name. Skipped
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
manifests=()
for manifest in deploy/k8s/*.yaml; do
    "$tools/kubernetes-validate" --strict --quiet "$manifest"
    manifests+=("$(basename "$manifest")")
done
claim="$("$tools/python" -c '
import sys, yaml
claims = [d["metadata"]["name"] for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "PersistentVolumeClaim"]
print(*claims)' "$work/job.yaml")"
grep -q "claimName: $claim\$" deploy/k8s/results-pod.yaml ||
    { echo "kubernetes: results-pod.yaml does not mount the job overlay's claim ($claim)" >&2; exit 1; }
echo "kubernetes: ok: ${overlays[*]} render and validate; so do ${manifests[*]}"
