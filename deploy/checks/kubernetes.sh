#!/usr/bin/env bash
# Check: every kustomize overlay under deploy/k8s/overlays renders with
# `kubectl kustomize` and validates, strictly (no unknown fields), against
# the Kubernetes schemas bundled in kubernetes-validate (offline), as does
# every plain manifest beside them (deploy/k8s/*.yaml); in each rendered
# overlay the Service selects the learner's pod and no other, on a port
# its container opens, the actors' learner URL names that Service and
# port, and every ConfigMap mounted is one rendered; the job overlay's
# learner exits non-zero when stopped before its end (an exit 0 would
# complete the Job); every learner takes SIGTERM as a stop for a restart
# (its pod moves: the actors are to wait for it); the results pod mounts the job overlay's claim, by
# its name; every pod (the results pod too) meets the "restricted" Pod
# Security Standard and mounts no service-account token; a disruption
# (eviction, preemption, drain) uses none of the Job's retries, its
# replacement waits for the stopped pod to end, and its restart policy is
# Never (which a failure policy needs). Every overlay renders with the
# network-policy component too, whose policies let the actors' pods alone
# reach the learner's, on the port it opens, and the actors reach only
# the learner and DNS. Skipped (exit 77) where kubectl is not installed.
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
# A rendered overlay, for the checks below: its objects, a fail() that
# exits naming it, and its pod templates by workload name; which
# workloads' pods a set of labels selects; the ports the learner opens.
cat >"$work/rendered.py" <<'PY'
import sys

import yaml


def load_rendered(path):
    overlay = path.rsplit("/", 1)[-1].removesuffix(".yaml")
    docs = [d for d in yaml.safe_load_all(open(path, encoding="utf-8")) if d]

    def fail(message):
        sys.exit(f"kubernetes: overlay {overlay}: {message}")

    templates = {
        d["metadata"]["name"]: d["spec"]["template"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet", "Job")
    }
    return docs, fail, templates


def pods_with(labels, templates):
    return sorted(
        name
        for name, template in templates.items()
        if labels.items() <= template["metadata"].get("labels", {}).items()
    )


def learner_ports(templates):
    ports = templates["flgfn-learner"]["spec"]["containers"][0].get("ports", [])
    return {p["containerPort"] for p in ports} | {p.get("name") for p in ports}
PY
overlays=()
for overlay in deploy/k8s/overlays/*/; do
    name="$(basename "$overlay")"
    kubectl kustomize "$overlay" >"$work/$name.yaml"
    "$tools/kubernetes-validate" --strict --quiet "$work/$name.yaml"
    overlays+=("$name ($(grep -c '^kind:' "$work/$name.yaml") resources)")
done
# Each overlay with the network-policy component, added as its header
# says (a copy of the manifests, the component in the overlay's own
# kustomization.yaml), checked below like the others, and for its
# policies.
cp -r deploy/k8s "$work/with-policies"
for overlay in "$work"/with-policies/overlays/*/; do
    name="$(basename "$overlay")"
    printf 'components:\n  - ../../components/network-policy\n' >>"$overlay/kustomization.yaml"
    kubectl kustomize "$overlay" >"$work/$name+network-policy.yaml"
    "$tools/kubernetes-validate" --strict --quiet "$work/$name+network-policy.yaml"
    PYTHONPATH="$work" "$tools/python" - "$work/$name+network-policy.yaml" <<'PY'
import sys

from rendered import learner_ports, load_rendered, pods_with

docs, fail, templates = load_rendered(sys.argv[1])
policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
if set(policies) != {"flgfn-learner", "flgfn-actor"}:
    fail(f"expected the policies flgfn-learner and flgfn-actor, not {sorted(policies)}")


def selected(selector):
    labels = selector.get("matchLabels", {})
    if not labels or selector.get("matchExpressions"):
        fail(f"a policy selector {selector} is not plain labels")
    return pods_with(labels, templates)


opened = learner_ports(templates)


def peer_pods(peer):
    # A namespaceSelector beside the podSelector reaches pods of that label
    # in other namespaces too, and an ipBlock any address: not the run's
    # pods alone.
    if set(peer) != {"podSelector"}:
        fail(f"a policy peer {peer} reaches beyond this run's pods (a namespaceSelector or ipBlock)")
    return selected(peer["podSelector"])


def only_opened_ports(rule, what):
    ports = rule.get("ports", [])
    if not ports or any(p["port"] not in opened or p.get("protocol", "TCP") != "TCP" for p in ports):
        fail(f"{what} allows ports {ports}, not the learner's gRPC port ({opened})")


policy = policies["flgfn-learner"]
if selected(policy["podSelector"]) != ["flgfn-learner"]:
    fail("the learner's policy does not select the learner's pod alone")
if policy.get("policyTypes") != ["Ingress"] or not policy.get("ingress"):
    fail("the learner's policy does not limit what comes in")
for rule in policy["ingress"]:
    sources = [peer_pods(peer) for peer in rule.get("from", [])]
    if sources != [["flgfn-actor"]]:
        fail(f"the learner takes connections from {sources or 'anywhere'}, not the actors' pods alone")
    only_opened_ports(rule, "the learner's policy")
policy = policies["flgfn-actor"]
if selected(policy["podSelector"]) != ["flgfn-actor"]:
    fail("the actors' policy does not select the actors' pods alone")
if sorted(policy.get("policyTypes", [])) != ["Egress", "Ingress"] or policy.get("ingress"):
    fail("the actors' policy lets connections in, or leaves what goes out open")
to_learner = [rule for rule in policy.get("egress", []) if rule.get("to")]
dns = [rule for rule in policy.get("egress", []) if not rule.get("to")]
for rule in to_learner:
    destinations = [peer_pods(peer) for peer in rule["to"]]
    if destinations != [["flgfn-learner"]]:
        fail(f"the actors may reach {destinations}, not the learner's pod alone")
    only_opened_ports(rule, "the actors' policy")
if len(to_learner) != 1 or len(dns) != 1 or {p["port"] for p in dns[0].get("ports", [])} != {53}:
    fail("the actors' policy lets out more than the learner and DNS (port 53), or not both")
PY
done
# The job overlay runs to completion: its learner a Job, nothing that
# restarts a finished one.
kinds="$(grep '^kind:' "$work/job.yaml" | sort | uniq -c | tr -s ' ' | paste -sd, -)"
if [[ "$kinds" != " 1 kind: ConfigMap, 1 kind: Deployment, 1 kind: Job, 1 kind: PersistentVolumeClaim, 1 kind: Service" ]]; then
    echo "kubernetes: the job overlay renders$kinds, not the learner's Job and claim, the actors' Deployment, Service and ConfigMap" >&2
    exit 1
fi
# How the rendered objects fit together (what a schema cannot see).
# The "restricted" Pod Security Standard's demands on a pod spec (the ones
# these manifests could miss), and no service-account token: the first
# missing, or None.
cat >"$work/restricted.py" <<'PY'
def restricted_problem(pod):
    if pod.get("automountServiceAccountToken") is not False:
        return "mounts a service-account token (automountServiceAccountToken is not false)"
    context = pod.get("securityContext", {})
    if context.get("runAsNonRoot") is not True:
        return "does not set runAsNonRoot"
    if context.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        return "has no RuntimeDefault seccompProfile (the restricted Pod Security Standard)"
    for container in pod["containers"]:
        settings = container.get("securityContext", {})
        if settings.get("allowPrivilegeEscalation") is not False:
            return f"container {container['name']} allows privilege escalation"
        if settings.get("capabilities", {}).get("drop") != ["ALL"]:
            return f"container {container['name']} does not drop all capabilities"
    return None
PY
for rendered in "$work"/*.yaml; do
    PYTHONPATH="$work" "$tools/python" - "$rendered" <<'PY'
import sys
from urllib.parse import urlsplit

from rendered import learner_ports, load_rendered, pods_with
from restricted import restricted_problem

docs, fail, templates = load_rendered(sys.argv[1])
services = [d for d in docs if d["kind"] == "Service"]
config_maps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
if len(services) != 1 or "flgfn-learner" not in templates or "flgfn-actor" not in templates:
    fail("expected one Service, the learner flgfn-learner and the actors flgfn-actor")
service = services[0]
selector = service["spec"]["selector"]
selected = pods_with(selector, templates)
if selected != ["flgfn-learner"]:
    fail(f"the Service's selector {selector} selects {selected}, not the learner's pod alone")
opened = learner_ports(templates)
for port in service["spec"]["ports"]:
    if port.get("targetPort", port["port"]) not in opened:
        fail(f"the Service's port {port} is not one the learner's container opens ({opened})")
service_ports = {p["port"] for p in service["spec"]["ports"]}
actor = templates["flgfn-actor"]["spec"]["containers"][0]
url = next(e["value"] for e in actor["env"] if e["name"] == "FLGFN_ACTOR__LEARNER")
address = urlsplit(url)
if address.hostname != service["metadata"]["name"] or address.port not in service_ports:
    fail(f"the actors' learner {url} is not the Service {service['metadata']['name']} on {service_ports}")
for name, template in templates.items():
    for volume in template["spec"].get("volumes", []):
        mapped = volume.get("configMap", {}).get("name")
        if mapped is not None and mapped not in config_maps:
            fail(f"{name} mounts the ConfigMap {mapped}, which is not rendered ({config_maps})")
for name, template in templates.items():
    problem = restricted_problem(template["spec"])
    if problem:
        fail(f"{name}: {problem}")
learner_env = {
    e["name"]: e.get("value")
    for e in templates["flgfn-learner"]["spec"]["containers"][0].get("env", [])
}
if learner_env.get("FLGFN_LEARNER__SIGTERM") != "restart":
    fail("the learner leaves learner.sigterm at end_run: a drained node or a new image would end the run for every actor")
job = next((d for d in docs if d["kind"] == "Job"), None)
if job is not None:
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    status = env.get("FLGFN_LEARNER__UNFINISHED_EXIT_STATUS", "0")
    if status in ("0", None):
        fail("the learner's Job leaves learner.unfinished_exit_status at 0: a drained pod would complete the Job")
    spec = job["spec"]
    ignored = [
        condition
        for rule in spec.get("podFailurePolicy", {}).get("rules", [])
        if rule["action"] == "Ignore"
        for condition in rule.get("onPodConditions", [])
    ]
    if {"type": "DisruptionTarget", "status": "True"} not in ignored:
        fail("the Job's podFailurePolicy does not ignore DisruptionTarget: every drain or eviction would use a retry")
    if spec["template"]["spec"].get("restartPolicy") != "Never":
        fail("the Job's restartPolicy is not Never, which a podFailurePolicy needs (the API server refuses it)")
    if spec.get("podReplacementPolicy") != "Failed":
        fail("the Job's podReplacementPolicy is not Failed: a replacement could start while the stopped learner holds the checkpoint folder")
PY
done
manifests=()
for manifest in deploy/k8s/*.yaml; do
    "$tools/kubernetes-validate" --strict --quiet "$manifest"
    manifests+=("$(basename "$manifest")")
    PYTHONPATH="$work" "$tools/python" - "$manifest" <<'PY'
import sys

import yaml
from restricted import restricted_problem

for doc in yaml.safe_load_all(open(sys.argv[1], encoding="utf-8")):
    if doc and doc["kind"] == "Pod":
        problem = restricted_problem(doc["spec"])
        if problem:
            sys.exit(f"kubernetes: {sys.argv[1]}: pod {doc['metadata']['name']} {problem}")
PY
done
claim="$("$tools/python" -c '
import sys, yaml
claims = [d["metadata"]["name"] for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "PersistentVolumeClaim"]
print(*claims)' "$work/job.yaml")"
grep -q "claimName: $claim\$" deploy/k8s/results-pod.yaml ||
    { echo "kubernetes: results-pod.yaml does not mount the job overlay's claim ($claim)" >&2; exit 1; }
echo "kubernetes: ok: ${overlays[*]} render and validate, with and without the network policies (which let the actors alone reach the learner), their Service, ports, actors' URL and ConfigMaps agree, their pods meet the restricted Pod Security Standard, their learner takes SIGTERM as a stop for a restart, and the Job's learner exits non-zero when stopped early, its disruptions not counted as failures; so do ${manifests[*]}"
