"""Run the worker in the current Python environment."""

from __future__ import annotations

import sys
from importlib import metadata


def wrap(worker_args: list[str], runner_config: dict, platform: str, mounts: list[str]) -> list[str]:
    return [sys.executable, "-m", "privbench.worker", *worker_args]


def environment(runner_config: dict) -> dict[str, str]:
    """Extra environment variables the worker needs (none locally)."""
    return {}


def stop(command: list[str], runner_config: dict) -> None:
    """Nothing outlives the worker's process group locally."""


# JAX's GPU support is a separate plugin (envs/requirements-cuda.txt), not installed by
# `make setup`; PyTorch's wheels for Linux carry CUDA unless built "+cpu".
JAX_CUDA_PLUGINS = ("jax-cuda13-plugin", "jax-cuda12-plugin")


def platform_problems(platform: str) -> list[str]:
    """Why this Python environment cannot run the frameworks on ``platform`` (empty: it can)."""
    if platform != "cuda":
        return []
    problems = []
    if _version("jax") and not any(map(_version, JAX_CUDA_PLUGINS)):
        problems.append(
            "platform 'cuda' with runner 'local': JAX here has no CUDA plugin, so every JAX run would fail "
            "with \"device 'cuda' is not available\"; install it with "
            "'.venv/bin/pip install -r envs/requirements-cuda.txt -c envs/constraints.txt' (README: CUDA), "
            "or run in the cuda image (runner.kind docker, podman or apptainer)")
    if (_version("torch") or "").endswith("+cpu"):
        problems.append(f"platform 'cuda' with runner 'local': PyTorch here is a CPU-only build ({_version('torch')})")
    return problems


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None
