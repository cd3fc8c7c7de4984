"""Experiments: one module per reproduced page.

Each module exposes
    NAME, TITLE, PAGE                 config section, page title, page file name
    curves(config) -> dict            curve id -> curve (a sweep or a single run)
    make_run_spec(curve, batch) -> dict
    import_frameworks(spec)           imports done before the memory budget applies
    measure(spec, metrics, phases, progress)   in the worker process
    page_outputs(config) -> list      charts and page the report writes
    report(config, table, out_dirs)   tables, charts and page from the tidy table
    config_problems(section) -> list  optional: rules on its section a schema cannot state

Adding a page = one module here, one rule file, one template.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXPERIMENTS = ("throughput", "cnn_microbatch", "memory_profile", "torch_cifar")


def get(name: str) -> ModuleType:
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}: choose one of {', '.join(EXPERIMENTS)}")
    return importlib.import_module(f"privbench.experiments.{name}")


def import_framework(framework: str) -> None:
    """Import a framework and start its runtime, so that cost is not timed as work."""
    from privbench.errors import require

    if framework == "jax":
        require("jax", "flax", "optax")
        import jax

        jax.devices()
    elif framework == "torch":
        require("torch")
        import torch

        torch.zeros(1)
    else:
        raise ValueError(f"unknown framework {framework!r}: choose jax or torch")
