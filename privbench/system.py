"""Description of the system a run executed on, stored in every record."""

from __future__ import annotations

import functools
import os
import platform
import shutil
import socket
import subprocess
from importlib import metadata
from pathlib import Path

from privbench.paths import REPO_ROOT

# Distributions whose versions matter for the measurements.
TRACKED_LIBRARIES = (
    "privbench", "jax", "jaxlib", "flax", "optax", "jax-privacy", "torch",
    "torchvision", "opacus", "flwr", "numpy", "dp-accounting", "snakemake",
)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def gpu_description() -> str | None:
    """GPU model(s) from nvidia-smi, or None when there is no GPU."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout.strip()
    except (subprocess.SubprocessError, OSError):
        return None
    return "; ".join(line.strip() for line in out.splitlines() if line.strip()) or None


# What the workflow itself writes into the checkout (the default preset's pages and
# charts): rewriting them is a run's output, not a change to the kit.
GENERATED_PATHS = ("docs/*.md", "assets/*")


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """Commit of the kit's checkout (``+dirty`` if it has local changes other than generated pages)."""
    if os.environ.get("PRIVBENCH_GIT_COMMIT"):  # set by container runners
        return os.environ["PRIVBENCH_GIT_COMMIT"]
    return checkout_commit(REPO_ROOT)


def checkout_commit(root: Path) -> str | None:
    """HEAD of the git checkout at ``root``, ``+dirty`` if a tracked file outside GENERATED_PATHS changed."""
    excluded = [f":(exclude){pattern}" for pattern in GENERATED_PATHS]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *excluded],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (subprocess.SubprocessError, OSError):
        return None
    return commit + ("+dirty" if dirty else "")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def describe_system() -> dict:
    return {
        "platform": platform.platform(),
        "processor": cpu_model(),
        "machine": platform.machine(),
        "cpu_count": available_cores(),
        "memory_total_mb": _memory_total_mb(),
        "python": platform.python_version(),
        "libraries": library_versions(),
        "gpu": gpu_description(),
        "git_commit": git_commit(),
        # Set by the container runners; None when running in the host environment.
        "container_image": os.environ.get("PRIVBENCH_IMAGE"),
        "container_image_digest": os.environ.get("PRIVBENCH_IMAGE_DIGEST"),
        "hostname": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        # Attestation evidence of a run on platform cvm (privbench.tee); None otherwise.
        "tee": None,
    }


def _memory_total_mb() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None
