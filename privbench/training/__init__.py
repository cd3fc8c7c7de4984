"""Training steps: one full optimiser update per ``Trainer.step()``, in both
frameworks, for each training mode.

    standard  gradient of the mean loss, AdamW
    clipped   per-example clipped gradients + Gaussian noise, AdamW
              (jax: jax-privacy; torch: Opacus)
    fast_dp   the same update as clipped (fixed batch), by the kit's own engine
              (privbench.dp)

The DP part of each mode is built by :mod:`privbench.training.dp_methods`.

The harness only sees :func:`make_trainer` and the :class:`Trainer` protocol.
Implementations are looked up in :data:`REGISTRY` and imported lazily, so a
user with only one framework installed can still run the other, and a new mode
is one registry entry plus its factory.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Protocol

from privbench.errors import MissingDependencyError
from privbench.models import FRAMEWORKS, PUBLISHED, check_size, check_variant
from privbench.training import dp_methods

MODES = ("standard", *dp_methods.NAMES)

# The published settings. Any key given in ``settings`` overrides its default;
# an unknown key is an error, so that a typo cannot silently fall back.
DEFAULT_SETTINGS = {
    "learning_rate": 1e-4,
    "l2_clip_norm": 1.0,
    "noise_std": 0.1,  # std of the noise on the *mean* clipped gradient
    "grad_sample_mode": "hooks",  # Opacus only
    "poisson_sampling": True,  # Opacus only
    # Opacus only: its data set is the fixed batch repeated to this many batches'
    # worth, so the sample rate is 1 / opacus_batches (published: 60)
    "opacus_batches": 60,
}

# (framework, trainer kind) -> "module:factory": "standard", or the kind of
# trainer that drives a DP method (dp_methods.LIBRARY / ENGINE). Each factory is
# called with the keyword arguments of make_trainer (after validation, settings
# completed); a DP trainer asks dp_methods for its mode's builder.
TRAINERS: dict[tuple[str, str], str] = {
    ("jax", "standard"): "privbench.training.jax_steps:StandardTrainer",
    ("jax", dp_methods.LIBRARY): "privbench.training.jax_steps:ClippedTrainer",
    ("jax", dp_methods.ENGINE): "privbench.training.jax_steps:FastDPTrainer",
    ("torch", "standard"): "privbench.training.torch_steps:StandardTrainer",
    ("torch", dp_methods.LIBRARY): "privbench.training.torch_steps:ClippedTrainer",
    ("torch", dp_methods.ENGINE): "privbench.training.torch_steps:FastDPTrainer",
}

# (framework, mode) -> "module:factory", for every mode: standard and each DP method.
REGISTRY: dict[tuple[str, str], str] = {
    **{key: path for key, path in TRAINERS.items() if key[1] == "standard"},
    **{(framework, method): TRAINERS[(framework, entry.trainer)]
       for (framework, method), entry in dp_methods.REGISTRY.items()},
}

# Modes that take a microbatch size: how many examples are processed at once,
# the update still being one per batch (jax: jax-privacy's microbatch_size;
# torch: the physical batch of Opacus' BatchMemoryManager): those a DP library
# drives. Elsewhere a microbatch size is rejected rather than ignored, so that
# a result is never labelled with a knob that had no effect.
MICROBATCH_MODES = {key for key, entry in dp_methods.REGISTRY.items() if entry.trainer == dp_methods.LIBRARY}

# Import name -> pip name, for the missing-dependency message.
_PIP_NAMES = {"jax_privacy": "jax-privacy", "jaxlib": "jax"}


class Trainer(Protocol):
    description: dict

    def step(self) -> object:
        """One full training update on the trainer's own in-memory batch(es);
        returns a handle to sync on."""

    def sync(self, handle) -> None:
        """Block until the step that returned ``handle`` has finished."""


def make_trainer(
    framework: str,
    model: str,
    size: str,
    mode: str,
    batch_size: int,
    microbatch_size: int | None = None,
    settings: dict | None = None,
    seed: int = 0,
    device: str = "cpu",
    model_variant: str = PUBLISHED,
) -> Trainer:
    """Build a trainer for one (framework, model, size, mode) configuration, on the
    model's ``model_variant`` (privbench.models.VARIANTS)."""
    if framework not in FRAMEWORKS:
        raise ValueError(
            f"unknown framework {framework!r}: choose one of {', '.join(FRAMEWORKS)}"
        )
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
    if (framework, mode) not in REGISTRY:
        available = sorted(m for f, m in REGISTRY if f == framework)
        raise ValueError(
            f"mode {mode!r} is not implemented for {framework}: choose one of "
            f"{', '.join(available)}"
        )
    check_size(model, size)
    check_variant(model_variant)
    if not _is_positive_int(batch_size):
        raise ValueError(f"batch size {batch_size!r} must be a positive integer")
    if microbatch_size is not None:
        if (framework, mode) not in MICROBATCH_MODES:
            raise ValueError(
                f"microbatch size {microbatch_size!r} is not supported for "
                f"{framework} {mode} mode (only for "
                f"{', '.join(f'{f} {m}' for f, m in sorted(MICROBATCH_MODES))}): "
                "pass microbatch_size=None"
            )
        if not _is_positive_int(microbatch_size):
            raise ValueError(
                f"microbatch size {microbatch_size!r} must be a positive integer or None"
            )
        if batch_size % microbatch_size:
            raise ValueError(
                f"batch size {batch_size} is not divisible by microbatch size "
                f"{microbatch_size}: choose a microbatch size that divides the batch"
            )
    unknown = set(settings or {}) - set(DEFAULT_SETTINGS)
    if unknown:
        raise ValueError(
            f"unknown setting(s) {', '.join(sorted(unknown))}: "
            f"known settings are {', '.join(DEFAULT_SETTINGS)}"
        )
    settings = {**DEFAULT_SETTINGS, **(settings or {})}
    for key, minimum in (("learning_rate", 0), ("l2_clip_norm", 0), ("opacus_batches", 0)):
        if not settings[key] > minimum:
            raise ValueError(f"setting {key}={settings[key]!r} must be > {minimum}")
    if not settings["noise_std"] >= 0:
        raise ValueError(f"setting noise_std={settings['noise_std']!r} must be >= 0")

    with _missing_dependency_hint(f"{framework} {mode} mode"):
        module_name, factory_name = REGISTRY[(framework, mode)].split(":")
        factory = getattr(importlib.import_module(module_name), factory_name)
        return factory(
            mode=mode,
            model=model,
            size=size,
            batch_size=batch_size,
            microbatch_size=microbatch_size,
            settings=settings,
            seed=seed,
            device=device,
            variant=model_variant,
        )


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@contextlib.contextmanager
def _missing_dependency_hint(what: str):
    """Turn a ModuleNotFoundError for a third-party package into a
    MissingDependencyError naming the package and the install command."""
    try:
        yield
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if not top or top == "privbench":
            raise  # a bug in the kit itself, not a missing install
        pip_name = _PIP_NAMES.get(top, top)
        raise MissingDependencyError(
            f"{what} needs the Python package {pip_name!r}, which is not "
            "installed: run `pip install -r envs/requirements.txt`",
            name=top,
        ) from exc
