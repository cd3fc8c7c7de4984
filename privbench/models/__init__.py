"""Benchmark models, one file per family, each holding its Flax NNX and PyTorch
versions side by side so that the two stay identical (same layers, same
parameter count).

Every family module exposes:

    SIZES: dict[str, dict]            hyper-parameters per size ("tiny" is the
                                      kit's own test size; small/medium/large are
                                      the published ones)
    PUBLISHED_PARAMS: dict[str, int]  published parameter counts per size
    torch_class() -> the torch.nn.Module class, called with SIZES[size] and variant
    jax_class() -> the flax.nnx.Module class, called with SIZES[size], variant and rngs
    loss_torch(outputs, targets) -> scalar mean loss
    loss_jax(outputs, targets) -> scalar mean loss
    synthetic_batch(size, batch_size, framework, seed) -> (inputs: tuple, targets)

A model is called as ``model(*inputs)``. The framework libraries are imported
lazily so that a user with only one framework installed can still run the other.

Every family comes in two variants (:data:`VARIANTS`), with the same parameters:

    published   each framework's model as the published benchmark code built it
                (Flax defaults in JAX: tanh GELU, LayerNorm epsilon 1e-6, bfloat16
                fused attention, per-pixel LayerNorm in Diffusion; torch: GroupNorm(8)
                in Diffusion, channels-last CNN convolutions); what the pages that
                reproduce published figures measure
    harmonized  the same function in both frameworks (exact GELU, epsilon 1e-5,
                float32 attention, GroupNorm(32)): for cross-framework checks
"""

from __future__ import annotations

import importlib
from types import ModuleType

MODELS = ("cnn", "transformer", "state_space", "diffusion")
SIZES = ("tiny", "small", "medium", "large")
FRAMEWORKS = ("jax", "torch")
VARIANTS = ("published", "harmonized")
PUBLISHED, HARMONIZED = VARIANTS

# Display names used in the published pages.
DISPLAY_NAMES = {
    "cnn": "CNN",
    "transformer": "Transformer",
    "state_space": "StateSpace",
    "diffusion": "Diffusion",
}


# torch's LayerNorm / GroupNorm epsilon; the harmonized JAX models take it too.
TORCH_NORM_EPS = 1e-5
FLAX_NORM_EPS = 1e-6  # Flax's default, which the published JAX models kept


def jax_norm_eps(variant: str) -> float:
    """The JAX models' norm epsilon: Flax's default as published, torch's when harmonized."""
    return FLAX_NORM_EPS if variant == PUBLISHED else TORCH_NORM_EPS


def jax_gelu_approximate(variant: str) -> bool:
    """``approximate`` of the JAX models' ``jax.nn.gelu``: Flax's default tanh
    approximation as published, torch's exact (erf) GELU when harmonized."""
    return variant == PUBLISHED


class UnknownModelError(ValueError):
    """Raised for a model or size name the kit does not know."""


def family(model: str) -> ModuleType:
    """The module implementing one model family."""
    if model not in MODELS:
        raise UnknownModelError(
            f"unknown model {model!r}: choose one of {', '.join(MODELS)}"
        )
    return importlib.import_module(f"privbench.models.{model}")


def check_size(model: str, size: str) -> None:
    sizes = family(model).SIZES
    if size not in sizes:
        raise UnknownModelError(
            f"unknown size {size!r} for model {model!r}: choose one of {', '.join(sizes)}"
        )


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise UnknownModelError(f"unknown model variant {variant!r}: choose one of {', '.join(VARIANTS)}")


def build(framework: str, model: str, size: str, seed: int = 0, variant: str = PUBLISHED):
    """Build a fresh model of one family, size and variant (:data:`VARIANTS`) in one framework."""
    check_size(model, size)
    check_variant(variant)
    fam = family(model)
    if framework == "torch":
        import torch

        with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG
            torch.manual_seed(seed)
            return fam.torch_class()(**fam.SIZES[size], variant=variant)
    if framework == "jax":
        from flax import nnx

        return fam.jax_class()(**fam.SIZES[size], variant=variant, rngs=nnx.Rngs(seed))
    raise UnknownModelError(f"unknown framework {framework!r}: choose jax or torch")


def count_params(framework: str, module) -> int:
    """Number of trainable parameters of a built model."""
    if framework == "torch":
        return sum(p.numel() for p in module.parameters() if p.requires_grad)
    from flax import nnx
    import jax

    state = nnx.state(module, nnx.Param)
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(state))
