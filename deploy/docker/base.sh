#!/usr/bin/env bash
# Makes sure the base image the Dockerfile starts FROM (debian:bookworm-slim)
# exists: nothing to do when Docker has it; else it is pulled where a
# registry answers; else, where none does, built: a minimal Debian 12 root
# made by debootstrap from Debian's package mirror (root needed) and loaded
# with `docker import`.
#
#   deploy/docker/base.sh [IMAGE]      # default debian:bookworm-slim
set -euo pipefail
image="${1:-debian:bookworm-slim}"
mirror="${FLGFN_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# A daemon that does not answer would read as "no registry" below, and
# the build would be minutes in before it failed at `docker import`.
if ! docker info >/dev/null 2>&1; then
    echo "base.sh: Docker does not answer here (docker info failed): start the daemon, or run as a user allowed to use it" >&2
    exit 1
fi
if docker image inspect "$image" >/dev/null 2>&1; then
    exit 0
fi
if timeout 300 docker pull --quiet "$image" >/dev/null 2>&1; then
    echo "base.sh: $image pulled" >&2
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "base.sh: $image cannot be pulled, and building it (debootstrap) needs root: run this script as root once, or docker pull $image where a registry is reachable" >&2
    exit 1
fi
# Debian's archive keys: debootstrap checks the mirror's signed Release
# file against them (without a keyring it would fetch over plain HTTP
# unverified), and fails on a mismatch.
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
if ! command -v debootstrap >/dev/null || [ ! -s "$keyring" ]; then
    echo "base.sh: installing debootstrap and debian-archive-keyring (Debian packages)" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap debian-archive-keyring >/dev/null
fi
root="$(mktemp -d)"
# debootstrap mounts /proc and /sys inside the root while it installs; one
# that failed can leave them mounted: unmounted first, and rm stays on the
# root's own file system whatever is left.
# (Each step may fail without stopping the next: errexit holds in a trap.)
remove_root() {
    local mounted
    for mounted in dev/pts dev proc sys; do
        if mountpoint -q "$root/$mounted"; then umount -l "$root/$mounted" || true; fi
    done
    rm -rf --one-file-system "$root" || true
}
trap remove_root EXIT
echo "base.sh: debootstrap bookworm from $mirror (a few minutes, once)" >&2
debootstrap --keyring="$keyring" --variant=minbase bookworm "$root" "$mirror" >/dev/null
# What a slim image leaves out: package lists and caches.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' \
    - "$image" >/dev/null
echo "base.sh: $image made ($(docker image inspect --format '{{.Size}}' "$image" | awk '{ printf "%.0f MB", $1 / 1e6 }'))" >&2
