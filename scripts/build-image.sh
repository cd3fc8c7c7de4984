#!/usr/bin/env bash
# Build one of the kit's container images from docker/ and tag it
# privbench-<platform>:<kit version>, the name the runners use by default.
#
#   scripts/build-image.sh cpu|cuda|cvm [extra build flags...]
#
# Environment:
#   RUNTIME      the container tool with its global flags: docker (default),
#                podman, or e.g. "podman --cgroup-manager cgroupfs"
#   BASE_IMAGE   base image; defaults: cpu -> python:3.11-slim-bookworm,
#                cuda and cvm -> privbench-cpu:<kit version> (build cpu first)
#   TAG          image name to build (default privbench-<platform>:<kit version>)
# Extra flags go to "<runtime> build" as they are, e.g. --network host or
# --build-arg WITHOUT="torch torchvision opacus" (see docker/cpu.Dockerfile).
set -euo pipefail
cd "$(dirname "$0")/.."

platform=${1:?usage: scripts/build-image.sh cpu|cuda|cvm [extra build flags...]}
shift
case "$platform" in
  cpu|cuda|cvm) ;;
  *) echo "build-image.sh: unknown platform '$platform': choose cpu, cuda or cvm" >&2; exit 2 ;;
esac
read -r -a runtime <<< "${RUNTIME:-docker}"
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' privbench/__init__.py)
tag=${TAG:-privbench-$platform:$version}

# The same commit string the kit records on the host (system.git_commit).
commit=unknown
if git rev-parse HEAD >/dev/null 2>&1; then
  commit=$(git rev-parse HEAD)
  [ -z "$(git status --porcelain --untracked-files=no)" ] || commit="$commit+dirty"
fi

base_args=()
if [ -n "${BASE_IMAGE:-}" ]; then
  base_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
elif [ "$platform" != cpu ]; then
  base_args=(--build-arg "BASE_IMAGE=privbench-cpu:$version")
fi

set -x
"${runtime[@]}" build -f "docker/$platform.Dockerfile" -t "$tag" \
  --build-arg "KIT_VERSION=$version" --build-arg "GIT_COMMIT=$commit" \
  "${base_args[@]}" "$@" .
