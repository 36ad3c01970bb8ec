#!/usr/bin/env bash
# Check: the TLS component (deploy/k8s/components/tls) renders with every
# overlay, and what it renders works. Each overlay with the component
# validates strictly (offline schemas); then kubernetes_tls.py runs the
# cpu overlay's rendered learner with its files, its three probe commands
# and one actor, as the pods would, against certificates made with the
# README's openssl recipe and put in the Secret's place. Uses the release
# binaries test.sh built. Skipped (exit 77) without kubectl or openssl.
set -euo pipefail
cd "$(dirname "$0")/../.."
for tool in kubectl openssl; do
    if ! command -v "$tool" >/dev/null; then
        echo "kubernetes_tls: skipped: $tool not installed"
        exit 77
    fi
done
# shellcheck source=deploy/env.sh
source deploy/env.sh >/dev/null
# shellcheck source=deploy/tools.sh
source deploy/tools.sh
# (Run alone too: the learners here read the caller's FLGFN_* otherwise.)
ignore_caller_settings
tools="$(lint_tools)"
cargo build --release --quiet --bin flgfn-learner --bin flgfn-actor --bin flgfn-health
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# A copy of the manifests, each overlay given the component as README.md
# says: in its own kustomization.yaml, so that its own patches come after
# the component's, as they will for a user.
cp -r deploy/k8s "$work/k8s"
for overlay in "$work"/k8s/overlays/*/; do
    name="$(basename "$overlay")"
    printf 'components:\n  - ../../components/tls\n' >>"$overlay/kustomization.yaml"
    kubectl kustomize "$overlay" >"$work/$name.yaml"
    "$tools/kubernetes-validate" --strict --quiet "$work/$name.yaml"
done
# The Secret's files, as README.md's recipe makes them for the host the
# actors dial.
secret="$work/secret"
mkdir "$secret"
(
    cd "$secret"
    openssl req -x509 -newkey rsa:3072 -nodes -days 2 -subj /CN=flgfn-ca -keyout ca.key -out ca.crt
    openssl req -newkey rsa:3072 -nodes -subj /CN=learner -keyout tls.key -out learner.csr
    printf 'subjectAltName=DNS:flgfn-learner\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >learner.ext
    openssl x509 -req -in learner.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile learner.ext -out tls.crt
) 2>"$work/openssl.log" || { cat "$work/openssl.log" >&2; exit 1; }
"$tools/python" deploy/checks/kubernetes_tls.py "$CARGO_TARGET_DIR/release" "$work" "$secret"
