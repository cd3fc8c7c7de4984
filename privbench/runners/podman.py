"""Run the worker in the platform's image with Podman (``runner.kind: podman``).

On this kind of host Podman may need global flags, e.g.
``runner.command: [podman, --runtime, runc, --cgroup-manager, cgroupfs]``.
"""

from __future__ import annotations

import os

from privbench.runners._oci import OciRuntime


def _user_flags() -> list[str]:
    # Rootless Podman maps the caller into the container with keep-id; as root,
    # the caller is root and files written to the mounts stay root's.
    if os.geteuid() != 0:
        return ["--userns", "keep-id"]
    return ["--user", "0:0"]


# GPUs through CDI (nvidia-ctk cdi generate), Podman's supported way.
RUNTIME = OciRuntime(tool="podman", gpu_flags=("--device", "nvidia.com/gpu=all"), user_flags=_user_flags)
wrap, environment, stop = RUNTIME.wrap, RUNTIME.environment, RUNTIME.stop
