"""The engine's Linear and Conv2d norms as Opacus norm samplers.

Opacus' fast-gradient-clipping path (``make_private(...,
grad_sample_mode="ghost")``, two backward passes) asks a norm sampler per
layer type for the examples' gradient norms. :func:`register` puts the kit's
there: each layer's norm by the form the shared cost model
(:mod:`privbench.dp.cost`) chooses for its shapes, the tiled Gram form (no
T x T Gram matrix is ever formed whole) or the direct form in a bounded
workspace (:mod:`privbench.dp.torch_rules`), in place of Opacus' whole Gram
matrices. :func:`restore` and :func:`registered` put Opacus' own back.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List

import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.grad_sample.utils import register_norm_sampler
from torch import nn

from privbench.dp.torch_rules import RULES, trainable


def norm_sample(layer: nn.Module, activations: List[torch.Tensor],
                backprops: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
    """Opacus norm sampler for nn.Linear and nn.Conv2d: per-example norms of the
    weight gradients (by the cost model's form) and of the bias gradients."""
    rule = RULES[type(layer)]
    x = activations[0]
    norms = {}
    if trainable(layer, "weight"):
        form = rule.route(layer, x, backprops.shape).norm  # gram or direct: only the norms are wanted
        norms[layer.weight] = rule.weight_sq_norms(layer, x, backprops, form).sqrt()
    if trainable(layer, "bias"):
        norms[layer.bias] = rule.bias_grads(layer, backprops).norm(dim=1)
    return norms


NORM_SAMPLERS = {nn.Linear: norm_sample, nn.Conv2d: norm_sample}


def register() -> dict:
    """Make Opacus' fast-gradient-clipping path use the kit's norm samplers.

    Returns the samplers it replaced (None where there was none), for :func:`restore`.
    """
    registry = GradSampleModuleFastGradientClipping.NORM_SAMPLERS
    previous = {layer_type: registry.get(layer_type) for layer_type in NORM_SAMPLERS}
    for layer_type, sampler in NORM_SAMPLERS.items():
        register_norm_sampler(layer_type)(sampler)
    return previous


def restore(previous: dict) -> None:
    """Put back the norm samplers that :func:`register` replaced."""
    registry = GradSampleModuleFastGradientClipping.NORM_SAMPLERS
    for layer_type, sampler in previous.items():
        if sampler is None:
            registry.pop(layer_type, None)
        else:
            registry[layer_type] = sampler


@contextlib.contextmanager
def registered() -> Iterator[None]:
    """The kit's norm samplers in Opacus' registry for the duration of a block."""
    previous = register()
    try:
        yield
    finally:
        restore(previous)
