#!/usr/bin/env bash
# Stand-in for a Docker Hub base image on hosts that cannot pull one: a minimal Debian bookworm root
# made with debootstrap from Debian's archive and imported as an image. Built once, cached by tag.
#
#   deploy/standin/base.sh TAG          # e.g. vpt-standin/base:bookworm
set -euo pipefail
tag=${1:?usage: base.sh TAG}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if docker image inspect "$tag" >/dev/null 2>&1; then
    echo "base image $tag: cached"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is needed: apt-get install -y debootstrap" >&2; exit 1; }
root=$(mktemp -d /tmp/vpt-standin-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "base image $tag: debootstrap bookworm from $mirror"
debootstrap --variant=minbase bookworm "$root" "$mirror" >"$root.log" 2>&1 \
    || { tail -30 "$root.log" >&2; exit 1; }
rm -f "$root.log"
# what a Docker Hub debian image has: the archive as apt source, no package caches
echo "deb $mirror bookworm main" >"$root/etc/apt/sources.list"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import -c 'CMD ["bash"]' -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$tag" >/dev/null
echo "base image $tag: built"
