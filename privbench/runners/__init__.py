"""Where an isolated run executes.

A runner turns the worker's command line into the command that starts it:
in this Python environment (``local``), or inside a container image (added
by the platforms work: docker, podman, apptainer). One file per runtime.
"""

from __future__ import annotations

import importlib

RUNNERS = ("local",)


def get(runner_config: dict | None):
    """The runner module for a ``runner:`` config section (default: local)."""
    kind = (runner_config or {}).get("kind", "local")
    if kind not in RUNNERS:
        raise ValueError(f"unknown runner {kind!r}: choose one of {', '.join(RUNNERS)}")
    return importlib.import_module(f"privbench.runners.{kind}")
