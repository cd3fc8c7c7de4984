#!/usr/bin/env bash
# Make a Debian bookworm base image with Python 3.11 from the Debian archive
# alone, for machines that cannot pull from a container registry (build the
# kit's images on it with BASE_IMAGE=<name>). Docker and Podman alike.
#
#   scripts/base-image.sh [NAME]     (default localhost/privbench-base:bookworm)
#
# Needs root, debootstrap and the container tool. Kept in the tool's image
# store: a second call with the image present does nothing.
# Environment: RUNTIME (the container command with its global flags, default
# "podman"; e.g. "docker -H unix:///run/my/docker.sock"), DEBIAN_MIRROR
# (default http://deb.debian.org/debian).
set -euo pipefail

name=${1:-localhost/privbench-base:bookworm}
read -r -a runtime <<< "${RUNTIME:-podman}"
if "${runtime[@]}" image inspect "$name" >/dev/null 2>&1; then
  echo "base-image.sh: $name exists"
  exit 0
fi

rootfs=$(mktemp -d /var/tmp/privbench-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
chmod 755 "$rootfs"  # it becomes the image's /: mktemp's 700 would lock out every user but root
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
  bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | "${runtime[@]}" import - "$name"
echo "base-image.sh: made $name"
