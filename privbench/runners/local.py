"""Run the worker in the current Python environment."""

from __future__ import annotations

import sys


def wrap(worker_args: list[str], runner_config: dict, platform: str, mounts: list[str]) -> list[str]:
    return [sys.executable, "-m", "privbench.worker", *worker_args]


def environment(runner_config: dict) -> dict[str, str]:
    """Extra environment variables the worker needs (none locally)."""
    return {}


def stop(command: list[str], runner_config: dict) -> None:
    """Nothing outlives the worker's process group locally."""
