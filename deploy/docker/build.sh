#!/usr/bin/env bash
# Builds the learner and actor images from a CPU bundle (deploy/bundle.sh)
# on a debian:bookworm-slim base (made by base.sh where none can be pulled).
#
#   deploy/docker/build.sh [TAG]     # flgfn-learner:TAG, flgfn-actor:TAG (default latest)
#   FLGFN_BUNDLE=cuda deploy/docker/build.sh [TAG]   # flgfn-learner:TAG (default cuda)
#
# FLGFN_BUNDLE=cuda builds the GPU learner's image from the CUDA bundle
# (~2.8 GB) and no actor image: actors run on CPU, from the CPU image, and
# a CUDA build under the CPU images' tag would replace them.
# FLGFN_DOCKER_BASE names another base image (default debian:bookworm-slim):
# the bundle needs the glibc of this machine or newer.
set -euo pipefail
flavour="${FLGFN_BUNDLE:-cpu}"
case "$flavour" in
    cpu) tag="${1:-latest}" targets=(learner actor) ;;
    cuda) tag="${1:-cuda}" targets=(learner) ;;
    *)
        echo "build.sh: FLGFN_BUNDLE is cpu or cuda, not '$flavour'" >&2
        exit 2
        ;;
esac
base="${FLGFN_DOCKER_BASE:-debian:bookworm-slim}"
cd "$(dirname "$0")/../.."
# Asked first: the bundle takes minutes to build, for nothing without it.
if ! docker info >/dev/null 2>&1; then
    echo "build.sh: Docker does not answer here (docker info failed): start the daemon, or run as a user allowed to use it" >&2
    exit 1
fi
# base.sh makes the default one where none can be pulled; another one
# comes from a registry when docker build needs it.
if [ -z "${FLGFN_DOCKER_BASE:-}" ]; then
    deploy/docker/base.sh "$base"
fi
context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
deploy/bundle.sh "--$flavour" "$context/flgfn" >&2
for target in "${targets[@]}"; do
    docker build --quiet --file deploy/docker/Dockerfile --target "$target" \
        --build-arg BASE="$base" \
        --tag "flgfn-$target:$tag" "$context" >/dev/null
    echo "build.sh: flgfn-$target:$tag ($flavour bundle)" >&2
done
# The checking stage leaves an untagged image behind (the classic builder
# keeps it); nothing needs it.
docker image prune --force --filter label=flgfn.stage=bundle >/dev/null
