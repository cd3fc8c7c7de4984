#!/usr/bin/env bash
# Install the Debian packages the container, SLURM and browser tests use, if missing:
# Podman (with runc), Docker (docker.io: dockerd, containerd, Debian's client
# /usr/bin/docker) and debootstrap for the image tests, SLURM and MUNGE for
# the cluster tests, Chromium for the site's browser test. Quick when all are
# installed; needs root and apt (elsewhere it says so, and those tests skip
# with the reason).
set -euo pipefail

packages=(podman runc docker.io debootstrap slurm-wlm munge chromium)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "test-infra: not installing ${missing[*]} (needs root and apt-get); the container, SLURM and browser tests will skip" >&2
  exit 0
fi
echo "test-infra: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}" >/dev/null
