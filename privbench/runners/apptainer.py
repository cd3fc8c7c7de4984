"""Run the worker in the platform's image with Apptainer (``runner.kind: apptainer``).

Images are SIF files, e.g. made from a built image with
``apptainer build privbench-cpu-0.1.0.sif docker-daemon://privbench-cpu:0.1.0``.
Apptainer runs as the calling user and shares the host's /dev and working
directory already; the records folder is bound, the host's environment is
left out (``--cleanenv``) so the image's own Python is used.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
from pathlib import Path

from privbench.errors import MissingDependencyError
from privbench.runners import CONTAINER_WORKER, image_environment, image_for

DEFAULT_IMAGE = "privbench-{platform}-{version}.sif"
TEE_CONFIGFS = Path("/sys/kernel/config")


def _command(runner_config: dict) -> list[str]:
    command = list(runner_config.get("command") or ["apptainer"])
    if shutil.which(command[0]) is None:
        raise MissingDependencyError(
            f"runner kind 'apptainer' needs the '{command[0]}' command, which is not installed or not "
            "on PATH: install Apptainer (apptainer.org), or choose another runner.kind")
    return command


def wrap(worker_args: list[str], runner_config: dict, platform: str, mounts: list[str]) -> list[str]:
    command = _command(runner_config)
    image = image_for(runner_config, platform, DEFAULT_IMAGE)
    flags = ["exec", "--cleanenv"]
    for folder in mounts:
        flags += ["--bind", folder]
    for name, value in image_environment(image, _sif_digest(Path(image), platform)).items():
        flags += ["--env", f"{name}={value}"]
    if platform == "cuda":
        flags.append("--nv")
    elif platform == "cvm" and TEE_CONFIGFS.is_dir():
        flags += ["--bind", str(TEE_CONFIGFS)]
    flags += runner_config.get("extra_flags") or []
    return [*command, *flags, image, *CONTAINER_WORKER, *worker_args]


def environment(runner_config: dict) -> dict[str, str]:
    return {}


def stop(command: list[str], runner_config: dict) -> None:
    """Apptainer's processes stay in the killed process group: nothing is left."""


def _sif_digest(path: Path, platform: str) -> str:
    if not path.is_file():
        raise MissingDependencyError(
            f"Apptainer image '{path}' does not exist: build the {platform} image (scripts/build-image.sh "
            f"{platform}), convert it with 'apptainer build {path} docker-daemon://privbench-{platform}:<version>', "
            f"or name another SIF file in runner.images.{platform}")
    stat = path.resolve().stat()
    return _file_sha256(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _file_sha256(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of a SIF file, once per file version (images are GBs; a sweep runs many times)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"
