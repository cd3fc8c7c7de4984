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
    (model, size)
    for model in models.MODELS
    for size in models.family(model).PUBLISHED_PARAMS
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


@pytest.mark.parametrize(("model", "size"), PUBLISHED)
def test_published_param_count_torch(model, size):
    with torch.device("meta"):
        module = models.build("torch", model, size)
    assert models.count_params("torch", module) == models.family(model).PUBLISHED_PARAMS[size]


@pytest.mark.parametrize(("model", "size"), PUBLISHED)
def test_published_param_count_jax(model, size):
    module = nnx.eval_shape(lambda: models.build("jax", model, size))
    assert models.count_params("jax", module) == models.family(model).PUBLISHED_PARAMS[size]


@pytest.mark.parametrize("model", models.MODELS)
def test_tiny_counts_agree(model):
    jax_count = models.count_params("jax", models.build("jax", model, "tiny"))
    torch_count = models.count_params("torch", models.build("torch", model, "tiny"))
    assert jax_count == torch_count > 0


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


@pytest.mark.parametrize("model", models.MODELS)
def test_builds_are_deterministic(model):
    def jax_params(seed):
        state = nnx.state(models.build("jax", model, "tiny", seed), nnx.Param)
        return [np.asarray(x) for x in jax.tree_util.tree_leaves(state)]

    def torch_params(seed):
        module = models.build("torch", model, "tiny", seed)
        return [p.detach().numpy() for p in module.parameters()]

    for params in (jax_params, torch_params):
        first, again, other = params(0), params(0), params(1)
        assert all(np.array_equal(a, b) for a, b in zip(first, again))
        assert not all(np.array_equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("model", models.MODELS)
def test_tiny_forward_and_loss_torch(model):
    fam = models.family(model)
    module = models.build("torch", model, "tiny")
    inputs, targets = fam.synthetic_batch("tiny", BATCH, "torch", seed=0)
    outputs = module(*inputs)
    assert tuple(outputs.shape) == tiny_output_shape(model, "torch")
    assert torch.isfinite(fam.loss_torch(outputs, targets))


@pytest.mark.parametrize("model", models.MODELS)
def test_tiny_forward_and_loss_jax(model):
    fam = models.family(model)
    module = models.build("jax", model, "tiny")
    inputs, targets = fam.synthetic_batch("tiny", BATCH, "jax", seed=0)
    outputs = module(*inputs)
    assert outputs.shape == tiny_output_shape(model, "jax")
    assert jnp.isfinite(fam.loss_jax(outputs, targets))
