"""The kit's JAX DP-SGD engine (privbench.dp.jax_engine) against a naive loop
over examples: the clipped gradient sum before noise, with clipping active
(two examples above the clip norm, two below), on every model of the matrix
and on a small model built to take every route and every fallback, asserting
the route each layer takes."""

from __future__ import annotations

import numpy as np
import pytest
from naive_dp import (BATCH, BFLOAT16_TOLERANCE, TOLERANCE, assert_matches, clip_between, model_routes,
                      naive_clipped_sum)

from privbench import models


def _jax_flat(tree) -> np.ndarray:
    import jax

    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def _check_jax(module, loss_fn, inputs, targets, tolerance=TOLERANCE) -> dict:
    """The engine's clipped sum == the naive one; returns the engine's description."""
    from flax import nnx

    from privbench.dp.jax_engine import ClippedGradEngine, clipped_grad_sum

    example_grad = nnx.jit(nnx.grad(lambda m, x, y: loss_fn(m(*x), y)))
    per_example = [
        _jax_flat(example_grad(module, tuple(x[i : i + 1] for x in inputs), targets[i : i + 1]))
        for i in range(len(targets))
    ]
    clip = clip_between(per_example)
    actual = _jax_flat(clipped_grad_sum(module, loss_fn, inputs, targets, clip))
    assert_matches(actual, naive_clipped_sum(per_example, clip), tolerance)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    return ClippedGradEngine(graphdef, loss_fn, clip).describe(params, rest, inputs, targets)


@pytest.mark.parametrize("variant", models.VARIANTS)
@pytest.mark.parametrize("size", ["tiny", "small"])
@pytest.mark.parametrize("model", models.MODELS)
def test_matches_naive_on_every_model(model, size, variant):
    """Every model in both variants: the published ones hold per-pixel LayerNorm
    (Diffusion) and bfloat16 fused attention (Transformer)."""
    import jax.numpy as jnp

    family = models.family(model)
    module = models.build("jax", model, size, seed=0, variant=variant)
    inputs, targets = family.synthetic_batch(size, BATCH, "jax", seed=1)
    bfloat16 = any(getattr(block, "attention_dtype", None) == jnp.bfloat16 for block in getattr(module, "blocks", []))
    description = _check_jax(module, family.loss_jax, inputs, targets,
                             BFLOAT16_TOLERANCE if bfloat16 else TOLERANCE)
    assert description["dp_fallback"] == []  # every layer of the matrix has its own rule
    assert description["dp_methods"] == model_routes("jax", model, size, variant)  # as the torch engine
    if (model, size) == ("state_space", "small"):  # the long depthwise convolution takes the FFT route
        assert "blocks.0.conv (Conv): fft" in description["dp_layers"]


def test_the_model_runs_on_the_whole_batch_where_its_arrays_are_the_examples_stacked():
    """Both forward forms (``dp_forward``) are taken by the matrix, so the test
    above checks both against the naive loop: the whole batch at once for the
    CNN, which max-pools and whose tapped arrays all carry the batch; per
    example (vmap) for the models without pooling. The two forms give the
    same clipped sum."""
    import jax
    from flax import nnx

    from privbench.dp.jax_engine import ClippedGradEngine

    forms = {}
    for model in models.MODELS:
        family = models.family(model)
        module = models.build("jax", model, "tiny", seed=0)
        inputs, targets = family.synthetic_batch("tiny", BATCH, "jax", seed=1)
        graphdef, params, rest = nnx.split(module, nnx.Param, ...)
        engine = ClippedGradEngine(graphdef, family.loss_jax, 1e-3)
        forms[model] = engine.describe(params, rest, inputs, targets)["dp_forward"]
        if model == "cnn":
            whole = jax.jit(engine)(params, rest, inputs, targets)
            engine._runs_on_whole_batch = lambda *args: False
            per_example = jax.jit(engine)(params, rest, inputs, targets)
            np.testing.assert_allclose(_jax_flat(whole), _jax_flat(per_example), rtol=1e-5, atol=1e-7)
    assert forms == {"cnn": "whole_batch", "transformer": "per_example", "state_space": "per_example",
                     "diffusion": "per_example"}


@pytest.mark.parametrize("padding", ["CAUSAL", "SAME", "VALID", ((3, 12),)])
def test_fft_route_matches_naive_at_every_padding(padding):
    """The FFT route (a depthwise 1-D kernel of 40 taps) over 37 positions (an
    odd length, shorter than the kernel where padded) against the naive loop."""
    import jax
    import optax
    from flax import nnx

    class DepthwiseModel(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(6, 6, (40,), feature_group_count=6, padding=padding, rngs=rngs)
            self.head = nnx.Linear(6, 3, rngs=rngs)

        def __call__(self, x):
            return self.head(jax.numpy.tanh(self.conv(x)).mean(axis=1))

    keys = jax.random.split(jax.random.key(2))
    length = 47 if padding == "VALID" else 37  # VALID needs the kernel to fit
    x = jax.random.normal(keys[0], (BATCH, length, 6))
    labels = jax.random.randint(keys[1], (BATCH,), 0, 3)
    description = _check_jax(DepthwiseModel(nnx.Rngs(0)), lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(
        logits, y).mean(), (x,), labels)
    assert "conv (Conv): fft" in description["dp_layers"]


def test_published_transformer_in_float32_matches_to_the_float32_tolerance():
    """The published Transformer's bfloat16 attention is what widens the tolerance
    above: the same model with its attention in float32 matches to TOLERANCE."""
    import jax.numpy as jnp

    family = models.family("transformer")
    module = models.build("jax", "transformer", "small", seed=0, variant=models.PUBLISHED)
    for block in module.blocks:
        block.attention_dtype = jnp.float32
    inputs, targets = family.synthetic_batch("small", BATCH, "jax", seed=1)
    _check_jax(module, family.loss_jax, inputs, targets)


def _jax_zoo():
    """A model taking every route of privbench.dp.jax_engine and both fallbacks."""
    import jax.numpy as jnp
    from flax import nnx

    class Temperature(nnx.Module):  # a leaf called with a Python number: whole-model fallback
        def __init__(self):
            self.gain = nnx.Param(jnp.ones(3))

        def __call__(self, x, temperature):
            return x * self.gain / temperature

    class Zoo(nnx.Module):
        def __init__(self, rngs):
            self.tokens = nnx.Embed(11, 8, rngs=rngs)
            self.causal = nnx.Conv(8, 8, (40,), feature_group_count=8, padding="CAUSAL", rngs=rngs)
            self.grouped = nnx.Conv(8, 8, (3,), feature_group_count=2, rngs=rngs)
            # a large kernel over few positions: per-example gradients, too large to keep
            self.deep = nnx.Conv(8, 8, (8,), padding="VALID", rngs=rngs)
            self.wide = nnx.Conv(4, 32, (3, 3), strides=2, rngs=rngs)  # few positions: gram
            self.norm = nnx.GroupNorm(8, num_groups=2, rngs=rngs)
            self.mix = nnx.Einsum("btd,df->btf", (8, 8), (8,), rngs=rngs)  # no rule: vjp
            self.proj = nnx.Linear(8, 8, rngs=rngs)  # 48 rows: per-example gradients kept
            self.shared = nnx.Linear(8, 8, rngs=rngs)  # called twice: vjp
            self.head = nnx.Linear(8 + 8 + 32, 3, rngs=rngs)  # one row: gram
            self.temperature = Temperature()
            self.offset = nnx.Param(jnp.zeros(3))  # owned by a non-leaf: whole-model fallback

        def __call__(self, tokens, image):
            x = self.grouped(jnp.tanh(self.causal(self.tokens(tokens))))
            deep = self.deep(x[:, :17]).mean(axis=1)
            x = self.shared(jnp.tanh(self.shared(self.mix(self.proj(self.norm(x))))))
            wide = self.wide(image).mean(axis=(1, 2))
            logits = self.head(jnp.concatenate([x.mean(axis=1), deep, wide], axis=1))
            return self.temperature(logits, 2.0) + self.offset

    return Zoo(nnx.Rngs(0))


def test_every_route_and_fallback():
    import jax
    import optax

    keys = jax.random.split(jax.random.key(1), 3)
    tokens = jax.random.randint(keys[0], (BATCH, 48), 0, 11)
    image = jax.random.normal(keys[1], (BATCH, 4, 4, 4))
    labels = jax.random.randint(keys[2], (BATCH,), 0, 3)

    def loss_fn(logits, y):
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    description = _check_jax(_jax_zoo(), loss_fn, (tokens, image), labels)
    layers = dict(line.split(": ") for line in description["dp_layers"])
    assert layers["causal (Conv)"] == "fft"
    assert layers["wide (Conv)"] == "gram"
    assert layers["tokens (Embed)"] == "segment"
    assert layers["norm (GroupNorm)"] == "elementwise"
    assert layers["mix (Einsum)"] == "vjp"
    assert layers["shared (Linear)"] == "vjp"
    assert "offset: whole_model" in description["dp_fallback"]
    assert {"direct", "kept"} & set(layers.values())
    assert layers["grouped (Conv)"] == "kept"
    assert layers["deep (Conv)"] == "direct"
    assert layers["proj (Linear)"] == "kept"
    assert layers["head (Linear)"] == "gram"
    assert "temperature (Temperature): whole_model" in description["dp_fallback"]
    assert "temperature.gain: whole_model" in description["dp_fallback"]
    assert description["dp_methods"] == (
        "direct 1, elementwise 1, fft 1, gram 2, kept 2, segment 1, vjp 2, whole_model 1")


def test_engine_divides_by_normalize_by_and_checks_the_clip_norm():
    import jax
    from flax import nnx

    from privbench.dp.jax_engine import ClippedGradEngine, clipped_grad_sum

    family = models.family("cnn")
    module = models.build("jax", "cnn", "tiny", seed=0)
    inputs, targets = family.synthetic_batch("tiny", BATCH, "jax", seed=1)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    engine = ClippedGradEngine(graphdef, family.loss_jax, 0.5, normalize_by=BATCH)
    mean = _jax_flat(jax.jit(engine)(params, rest, tuple(inputs), targets))
    total = _jax_flat(clipped_grad_sum(module, family.loss_jax, inputs, targets, 0.5))
    np.testing.assert_allclose(mean * BATCH, total, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="must be > 0"):
        ClippedGradEngine(graphdef, family.loss_jax, 0.0)


@pytest.mark.parametrize("dimension_numbers, window, padding, channels", [
    (("NHWC", "HWIO", "NHWC"), (3, 3), "SAME", (3, 4)),
    (("NCHW", "OIHW", "NCHW"), (2, 3), ((0, 2), (1, -1)), (3, 4)),  # asymmetric, one pad negative
    (("NWC", "WIO", "NWC"), (5,), "VALID", (4, 2)),  # fewer output channels: g^T x first
])
def test_shifted_matmuls_equal_vmap_of_the_convolutions_vjp(dimension_numbers, window, padding, channels):
    """The per-example kernel gradients of the kept/direct Conv route (one matmul
    per kernel offset) == vmap of the convolution's vjp, in any layout."""
    import jax
    from jax import lax

    from privbench.dp.jax_rules import _shifted_matmuls

    lhs_spec, rhs_spec, _ = dimension_numbers
    numbers = lax.conv_dimension_numbers((1,) * len(lhs_spec), (1,) * len(rhs_spec), dimension_numbers)
    letters = "HW"[-len(window):]  # the spatial dimensions, one example a batch of one
    sizes = {"N": 1, "C": channels[0], **dict(zip(letters, (6, 9)[-len(window):]))}
    kernel_sizes = {"O": channels[1], "I": channels[0], **dict(zip(letters, window))}
    keys = jax.random.split(jax.random.key(0), 3)
    lhs = jax.random.normal(keys[0], (BATCH, *(sizes[d] for d in lhs_spec)))
    kernel = jax.random.normal(keys[1], tuple(kernel_sizes[d] for d in rhs_spec))
    conv = {"window_strides": (1,) * len(window), "padding": padding, "lhs_dilation": None,
            "rhs_dilation": None, "dimension_numbers": numbers, "feature_group_count": 1,
            "batch_group_count": 1, "precision": None, "preferred_element_type": None}

    def convolve(lhs_i, k):
        return lax.conv_general_dilated(lhs_i, k, **conv)

    g = jax.random.normal(keys[2], jax.vmap(convolve, in_axes=(0, None))(lhs, kernel).shape)
    expected = jax.vmap(lambda lhs_i, g_i: jax.vjp(lambda k: convolve(lhs_i, k), kernel)[1](g_i)[0])(lhs, g)
    np.testing.assert_allclose(_shifted_matmuls(lhs, g, kernel.shape, conv), expected, rtol=1e-4, atol=1e-4)
