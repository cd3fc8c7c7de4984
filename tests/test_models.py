"""The benchmark models: published parameter counts in both frameworks, and
cheap end-to-end checks on the tiny size.

Published sizes are only built abstractly (torch's meta device, nnx.eval_shape)
so that counting the large ones costs no memory or time; no test runs a
published size forward. Per-example gradients (Opacus hooks, jax-privacy's
vmap) are checked against a naive reference in test_training.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from privbench import models

PUBLISHED = [
    (model, size, variant)
    for model in models.MODELS
    for size in models.family(model).PUBLISHED_PARAMS
    for variant in models.VARIANTS
]
BATCH = 3


def tiny_output_shape(model: str, framework: str) -> tuple:
    spec = models.family(model).SIZES["tiny"]
    if model == "cnn":
        return (BATCH, spec["num_classes"])
    if model == "diffusion":
        height, width, channels = spec["input_shape"]
        if framework == "torch":
            return (BATCH, channels, height, width)
        return (BATCH, height, width, channels)
    return (BATCH, spec["seq_len"], spec["vocab_size"])


def test_every_family_publishes_small_medium_large():
    for model in models.MODELS:
        fam = models.family(model)
        assert set(fam.SIZES) == set(models.SIZES)
        assert set(fam.PUBLISHED_PARAMS) == {"small", "medium", "large"}


@pytest.mark.parametrize(("model", "size", "variant"), PUBLISHED)
def test_published_param_count_torch(model, size, variant):
    with torch.device("meta"):
        module = models.build("torch", model, size, variant=variant)
    assert models.count_params("torch", module) == models.family(model).PUBLISHED_PARAMS[size]


@pytest.mark.parametrize(("model", "size", "variant"), PUBLISHED)
def test_published_param_count_jax(model, size, variant):
    module = nnx.eval_shape(lambda: models.build("jax", model, size, variant=variant))
    assert models.count_params("jax", module) == models.family(model).PUBLISHED_PARAMS[size]


@pytest.mark.parametrize("variant", models.VARIANTS)
@pytest.mark.parametrize("model", models.MODELS)
def test_tiny_counts_agree(model, variant):
    jax_count = models.count_params("jax", models.build("jax", model, "tiny", variant=variant))
    torch_count = models.count_params("torch", models.build("torch", model, "tiny", variant=variant))
    assert jax_count == torch_count > 0


def test_unknown_variant_is_named():
    with pytest.raises(models.UnknownModelError, match="variant 'faithful'.*published, harmonized"):
        models.build("torch", "cnn", "tiny", variant="faithful")


def _jax_blocks(model, variant):
    return list(models.build("jax", model, "tiny", variant=variant).blocks)


def _torch_blocks(model, variant):
    return list(models.build("torch", model, "tiny", variant=variant).blocks)


def test_published_diffusion_norms():
    """JAX: LayerNorm over each pixel's channels, epsilon 1e-6; torch: GroupNorm(8)."""
    for block in _jax_blocks("diffusion", "published"):
        assert isinstance(block.norm, nnx.LayerNorm) and block.norm.epsilon == 1e-6
        assert block.approximate  # Flax's tanh GELU
    for block in _torch_blocks("diffusion", "published"):
        assert isinstance(block.norm, torch.nn.GroupNorm)
        assert (block.norm.num_groups, block.norm.eps) == (8, 1e-5)


def test_harmonized_diffusion_norms_are_one_groupnorm():
    groups = models.family("diffusion").SIZES["tiny"]["norm_groups"]
    for block in _jax_blocks("diffusion", "harmonized"):
        assert isinstance(block.norm, nnx.GroupNorm)
        assert (block.norm.num_groups, block.norm.epsilon, block.approximate) == (groups, 1e-5, False)
    for block in _torch_blocks("diffusion", "harmonized"):
        assert (block.norm.num_groups, block.norm.eps) == (groups, 1e-5)


@pytest.mark.parametrize("model", ["transformer", "state_space"])
def test_published_jax_language_models_keep_flax_defaults(model):
    module = models.build("jax", model, "tiny", variant="published")
    for block in module.blocks:
        assert block.approximate
    assert module.ln_final.epsilon == 1e-6
    harmonized = models.build("jax", model, "tiny", variant="harmonized")
    assert harmonized.ln_final.epsilon == 1e-5
    assert not any(block.approximate for block in harmonized.blocks)


def test_published_transformer_attention():
    """Separate q, k, v projections in both frameworks; JAX attends in bfloat16
    through jax.nn.dot_product_attention, and returns float32."""
    for block in _jax_blocks("transformer", "published"):
        assert all(isinstance(getattr(block, name), nnx.Linear) for name in ("q", "k", "v"))
        assert block.attention_dtype == jnp.bfloat16
    for block in _torch_blocks("transformer", "published"):
        assert all(isinstance(getattr(block, name), torch.nn.Linear) for name in ("q", "k", "v"))
    for block in _jax_blocks("transformer", "harmonized"):
        assert block.attention_dtype == jnp.float32 and isinstance(block.qkv, nnx.Linear)
    assert all(hasattr(block, "qkv") for block in _torch_blocks("transformer", "harmonized"))
    module = models.build("jax", "transformer", "tiny", variant="published")
    inputs, _ = models.family("transformer").synthetic_batch("tiny", BATCH, "jax", seed=0)
    jaxpr = str(jax.make_jaxpr(lambda tokens: module(tokens))(*inputs))
    assert "bf16" in jaxpr
    assert module(*inputs).dtype == jnp.float32


@pytest.mark.parametrize(("variant", "channels_last"), [("published", True), ("harmonized", False)])
def test_torch_cnn_first_conv_input_layout(variant, channels_last):
    module = models.build("torch", "cnn", "tiny", variant=variant)
    seen = []
    module.layers[0].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    inputs, _ = models.family("cnn").synthetic_batch("tiny", BATCH, "torch", seed=0)
    module(*inputs)
    assert seen[0].is_contiguous(memory_format=torch.channels_last) == channels_last
    assert seen[0].is_contiguous() != channels_last


@pytest.mark.parametrize("model", models.MODELS)
def test_synthetic_batch_is_the_same_data_in_both_frameworks(model):
    fam = models.family(model)
    jax_inputs, jax_targets = fam.synthetic_batch("tiny", BATCH, "jax", seed=5)
    torch_inputs, torch_targets = fam.synthetic_batch("tiny", BATCH, "torch", seed=5)

    def as_nhwc(tensor):
        array = tensor.numpy()
        # Images are NCHW in torch, NHWC in JAX.
        return array.transpose(0, 2, 3, 1) if array.ndim == 4 else array

    for j, t in zip((*jax_inputs, jax_targets), (*torch_inputs, torch_targets)):
        np.testing.assert_array_equal(np.asarray(j), as_nhwc(t))
    again, _ = fam.synthetic_batch("tiny", BATCH, "jax", seed=5)
    other, _ = fam.synthetic_batch("tiny", BATCH, "jax", seed=6)
    assert np.array_equal(again[0], jax_inputs[0])
    assert not np.array_equal(other[0], jax_inputs[0])


@pytest.mark.parametrize("variant", models.VARIANTS)
@pytest.mark.parametrize("model", models.MODELS)
def test_builds_are_deterministic(model, variant):
    def jax_params(seed):
        state = nnx.state(models.build("jax", model, "tiny", seed, variant), nnx.Param)
        return [np.asarray(x) for x in jax.tree_util.tree_leaves(state)]

    def torch_params(seed):
        module = models.build("torch", model, "tiny", seed, variant)
        return [p.detach().numpy() for p in module.parameters()]

    for params in (jax_params, torch_params):
        first, again, other = params(0), params(0), params(1)
        assert all(np.array_equal(a, b) for a, b in zip(first, again))
        assert not all(np.array_equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("variant", models.VARIANTS)
@pytest.mark.parametrize("model", models.MODELS)
def test_tiny_forward_and_loss_torch(model, variant):
    fam = models.family(model)
    module = models.build("torch", model, "tiny", variant=variant)
    inputs, targets = fam.synthetic_batch("tiny", BATCH, "torch", seed=0)
    outputs = module(*inputs)
    assert tuple(outputs.shape) == tiny_output_shape(model, "torch")
    assert torch.isfinite(fam.loss_torch(outputs, targets))


@pytest.mark.parametrize("variant", models.VARIANTS)
@pytest.mark.parametrize("model", models.MODELS)
def test_tiny_forward_and_loss_jax(model, variant):
    fam = models.family(model)
    module = models.build("jax", model, "tiny", variant=variant)
    inputs, targets = fam.synthetic_batch("tiny", BATCH, "jax", seed=0)
    outputs = module(*inputs)
    assert outputs.shape == tiny_output_shape(model, "jax")
    assert jnp.isfinite(fam.loss_jax(outputs, targets))
