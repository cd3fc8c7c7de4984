"""Errors with messages that say what is wrong and how to fix it."""

from __future__ import annotations

import importlib

INSTALL_HINT = "install the kit's pinned environment: make setup (or .venv/bin/pip install -r envs/requirements.txt)"

# import name -> distribution name, for the message
_DISTRIBUTIONS = {"jax_privacy": "jax-privacy", "flwr": "flwr", "opacus": "opacus", "flax": "flax"}


class MissingDependencyError(ImportError):
    """An optional package needed by the requested run is not installed."""


def require(*modules: str) -> None:
    """Import ``modules`` or fail naming the missing package and the fix."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            dist = _DISTRIBUTIONS.get(name, name)
            raise MissingDependencyError(
                f"the Python package '{dist}' is needed for this run but is not installed ({exc}); "
                f"{INSTALL_HINT}"
            ) from exc
