"""Run the worker in the platform's image with Docker (``runner.kind: docker``)."""

from __future__ import annotations

import os

from privbench.runners._oci import OciRuntime


def _user_flags() -> list[str]:
    return ["--user", f"{os.getuid()}:{os.getgid()}"]


RUNTIME = OciRuntime(tool="docker", gpu_flags=("--gpus", "all"), user_flags=_user_flags)
wrap, environment, stop = RUNTIME.wrap, RUNTIME.environment, RUNTIME.stop
