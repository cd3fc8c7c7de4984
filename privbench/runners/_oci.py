"""What Docker and Podman share: the same ``run`` command line, image inspection, cleanup.

A run's container gets the records folder (read-write) and the working
directory (read-only, also the container's working directory, so relative
data paths resolve), no network, the host's IPC namespace (PyTorch's
shared-memory tensors), the calling user's identity (result files stay
theirs), and the image name and digest as environment variables. CUDA
images get the runtime's GPU flags; cvm images the guest's TEE report
interfaces.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from privbench.errors import MissingDependencyError
from privbench.runners import CONTAINER_WORKER, image_environment, image_for

DEFAULT_IMAGE = "privbench-{platform}:{version}"
# What attestation reads in a confidential VM guest (see privbench.tee).
TEE_CONFIGFS = Path("/sys/kernel/config")
TEE_DEVICE = Path("/dev/sev-guest")


@dataclass(frozen=True)
class OciRuntime:
    tool: str                             # the command's name: docker, podman
    gpu_flags: tuple[str, ...]            # how a container gets every GPU
    user_flags: Callable[[], list[str]]   # run as the calling user

    def command(self, runner_config: dict) -> list[str]:
        """The runtime's command with its global flags (``runner.command``)."""
        command = list(runner_config.get("command") or [self.tool])
        if shutil.which(command[0]) is None:
            raise MissingDependencyError(
                f"runner kind '{self.tool}' needs the '{command[0]}' command, which is not installed "
                f"or not on PATH: install {self.tool}, or choose another runner.kind")
        return command

    def wrap(self, worker_args: list[str], runner_config: dict, platform: str, mounts: list[str]) -> list[str]:
        command = self.command(runner_config)
        image = image_for(runner_config, platform, DEFAULT_IMAGE)
        digest = _image_id(tuple(command), image, platform)
        cwd = os.getcwd()
        flags = ["run", "--rm", "--name", f"privbench-{secrets.token_hex(6)}", "--network", "none",
                 "--ipc", "host", *self.user_flags()]
        if cwd != "/":
            flags += ["--volume", f"{cwd}:{cwd}:ro", "--workdir", cwd]
        for folder in mounts:
            flags += ["--volume", f"{folder}:{folder}"]
        for name, value in image_environment(image, digest).items():
            flags += ["--env", f"{name}={value}"]
        flags += self.platform_flags(platform)
        flags += runner_config.get("extra_flags") or []
        return [*command, *flags, image, *CONTAINER_WORKER, *worker_args]

    def platform_flags(self, platform: str) -> list[str]:
        if platform == "cuda":
            return list(self.gpu_flags)
        if platform == "cvm":
            flags = []
            if TEE_CONFIGFS.is_dir():
                flags += ["--volume", f"{TEE_CONFIGFS}:{TEE_CONFIGFS}"]
            if TEE_DEVICE.exists():
                flags += ["--device", str(TEE_DEVICE)]
            return flags
        return []

    def environment(self, runner_config: dict) -> dict[str, str]:
        return {}

    def stop(self, command: list[str], runner_config: dict) -> None:
        """Remove the run's container: it keeps running when its client is killed."""
        name = command[command.index("--name") + 1]
        subprocess.run([*self.command(runner_config), "rm", "--force", name],
                       capture_output=True, timeout=120)


@functools.lru_cache(maxsize=None)
def _image_id(command: tuple[str, ...], image: str, platform: str) -> str:
    """The image's content digest (its ID: the digest of its configuration)."""
    inspect = subprocess.run([*command, "image", "inspect", "--format", "{{.Id}}", image],
                             capture_output=True, text=True, timeout=120)
    if inspect.returncode != 0:
        raise MissingDependencyError(
            f"container image '{image}' was not found by {command[0]} ({inspect.stderr.strip()[:300]}): "
            f"build it with RUNTIME={command[0]} scripts/build-image.sh {platform}, "
            f"or name another image in runner.images.{platform}")
    image_id = inspect.stdout.strip()
    return image_id if image_id.startswith("sha256:") else f"sha256:{image_id}"
