"""The DP-SGD methods: one registry ``(framework, method) -> builder``.

The only place that calls Opacus' ``make_private``, jax-privacy's
``clipped_grad`` or the kit's engines (``privbench.dp``), and the only noise
formula. The vocabulary, shared by the schema's enums, the trainers and the pages:

    standard  no DP (no builder)
    clipped   the framework's DP library: Opacus (torch; option grad_sample_mode,
              see GRAD_SAMPLE_MODES) or jax-privacy (jax; option microbatch_size)
    fast_dp   the kit's own exact DP-SGD engine (privbench.dp), one backward pass

A torch builder wraps a module and its optimiser; a jax builder returns the
clipped-gradient-sum function of ``(params, rest, inputs, targets)``.
Adding a method is one entry in :data:`REGISTRY` (and its builder, unless it is
an existing one with other options): the training modes, the trainers and the
presets' checks all take the vocabulary from here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

# Which trainer drives a method (privbench.training: one per framework and kind).
LIBRARY = "library"  # a DP library's own loop: wraps a data loader, takes a microbatch size
ENGINE = "engine"  # the kit's engine: one fixed batch, one forward and one backward pass


@dataclass(frozen=True)
class Method:
    """A DP method of one framework: its builder and the kind of trainer that drives it."""

    build: Callable
    trainer: str  # LIBRARY or ENGINE

# Opacus grad-sample modes the clipped method takes with the plain loss ("ghost"
# also needs Opacus' wrapped criterion: only the memory page runs it, via
# opacus_private(criterion=...)). The schema's enum is this list.
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew")


def noise_multiplier(noise_std: float, batch_size: int, l2_clip_norm: float) -> float:
    """Opacus' noise_multiplier for Gaussian noise of std ``noise_std`` on the *mean*
    clipped gradient of ``batch_size`` examples: Opacus adds std noise_multiplier * clip
    to the clipped sum and divides by the batch (published: 0.1 * B with clip 1)."""
    return noise_std * batch_size / l2_clip_norm


def check_grad_sample_mode(grad_sample_mode: str) -> None:
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(
            f"grad_sample_mode {grad_sample_mode!r} is not supported by the clipped "
            f"mode: choose one of {', '.join(GRAD_SAMPLE_MODES)}"
        )


# --------------------------------------------------------------------------- torch

@functools.cache
def fix_opacus_channels_last_conv() -> None:
    """Opacus 1.6's Conv2d grad sampler unfolds activations with ``as_strided`` as if
    they were contiguous NCHW: on channels-last activations (the published PyTorch
    CNN's) its per-example weight gradients are wrong. Once per process, register in
    Opacus' registry a wrapper that hands it a contiguous copy (a no-op for NCHW)."""
    from opacus.grad_sample.conv import compute_conv_grad_sample
    from opacus.grad_sample.utils import register_grad_sampler
    from torch import nn

    @register_grad_sampler(nn.Conv2d)
    def contiguous_conv_grad_sample(layer, activations, backprops):
        return compute_conv_grad_sample(layer, [a.contiguous() for a in activations], backprops)



def opacus_private(module, optimizer, data_loader, *, noise_multiplier: float, max_grad_norm: float,
                   grad_sample_mode: str = "hooks", poisson_sampling: bool = True, noise_generator=None,
                   accountant: str = "prv", criterion=None) -> tuple:
    """Opacus' ``PrivacyEngine.make_private``: (module, optimizer, data_loader), plus
    Opacus' wrapped criterion when one is given (its ghost-clipping path)."""
    from opacus import PrivacyEngine

    fix_opacus_channels_last_conv()
    if criterion is None:
        check_grad_sample_mode(grad_sample_mode)
    extra = {} if criterion is None else {"criterion": criterion}
    return PrivacyEngine(accountant=accountant).make_private(
        module=module, optimizer=optimizer, data_loader=data_loader, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, poisson_sampling=poisson_sampling, grad_sample_mode=grad_sample_mode,
        noise_generator=noise_generator, **extra)


def kit_private(module, optimizer, *, max_grad_norm: float, noise_multiplier: float,
                expected_batch_size: int | None = None, noise_generator=None, observer=None):
    """The kit's engine around ``optimizer`` (Opacus' noise convention); train with
    ``dp.step(loss_fn, inputs, targets)``, list its routes with ``dp.describe(...)``;
    ``observer`` (a ``PhaseObserver``) is told of each phase of a step (the memory page meters them)."""
    from privbench.dp.torch_engine import make_private

    return make_private(module, optimizer, max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier,
                        expected_batch_size=expected_batch_size, noise_generator=noise_generator, observer=observer)


# --------------------------------------------------------------------------- jax

def jax_privacy_grad(graphdef, loss_fn, l2_clip_norm: float, normalize_by: float,
                     microbatch_size: int | None = None) -> Callable:
    """jax_privacy's per-example clipped gradient sum, divided by ``normalize_by``, as a
    function of (params, rest, inputs, targets). Each example is clipped on its own
    (keep_batch_dim=True hands the loss a batch of one); ``microbatch_size`` only sets
    how many examples are vmapped at once (a memory knob)."""
    import jax_privacy

    from privbench.training.jax_steps import pure_loss

    return jax_privacy.clipped_grad(pure_loss(graphdef, loss_fn), argnums=0, batch_argnums=(2, 3),
                                    l2_clip_norm=l2_clip_norm, normalize_by=normalize_by,
                                    microbatch_size=microbatch_size)


def kit_grad(graphdef, loss_fn, l2_clip_norm: float, normalize_by: float,
             microbatch_size: int | None = None) -> Callable:
    """The kit's JAX engine: the same function as :func:`jax_privacy_grad` (one pass, no
    microbatches), with ``.describe(params, rest, inputs, targets)`` listing its routes."""
    if microbatch_size is not None:
        raise ValueError("the kit's engine takes no microbatch size")
    from privbench.dp.jax_engine import ClippedGradEngine

    return ClippedGradEngine(graphdef, loss_fn, l2_clip_norm, normalize_by)


REGISTRY: dict[tuple[str, str], Method] = {
    ("torch", "clipped"): Method(opacus_private, LIBRARY),
    ("torch", "fast_dp"): Method(kit_private, ENGINE),
    ("jax", "clipped"): Method(jax_privacy_grad, LIBRARY),
    ("jax", "fast_dp"): Method(kit_grad, ENGINE),
}

# Every DP method's name, in registry order (the training modes after "standard").
NAMES = tuple(dict.fromkeys(method for _, method in REGISTRY))


def builder(framework: str, method: str) -> Callable:
    """The builder of a DP method (see the module's docstring)."""
    try:
        return REGISTRY[(framework, method)].build
    except KeyError:
        known = ", ".join(f"{f} {m}" for f, m in REGISTRY)
        raise ValueError(f"no DP method {method!r} for {framework}: known are {known}") from None
