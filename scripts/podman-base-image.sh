#!/usr/bin/env bash
# Make a Debian bookworm base image with Python 3.11 for Podman, from the
# Debian archive alone, for machines that cannot pull from a container
# registry (build the kit's images on it with BASE_IMAGE=<name>).
#
#   scripts/podman-base-image.sh [NAME]     (default localhost/privbench-base:bookworm)
#
# Needs root, debootstrap and podman. Kept in Podman's image store: a second
# call with the image present does nothing.
# Environment: PODMAN (the podman command with its global flags, default
# "podman"), DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail

name=${1:-localhost/privbench-base:bookworm}
read -r -a podman <<< "${PODMAN:-podman}"
if "${podman[@]}" image exists "$name"; then
  echo "podman-base-image.sh: $name exists"
  exit 0
fi

rootfs=$(mktemp -d /var/tmp/privbench-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
  bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | "${podman[@]}" import - "$name"
echo "podman-base-image.sh: made $name"
