"""The kit's fast DP-SGD (mode fast_dp, privbench.dp) against a naive loop
over examples: the clipped gradient sum before noise, with clipping active
(two examples above the clip norm, two below), on every model of the matrix,
on EfficientNet-B0 (torch), and on small models built to take every route
and every fallback; plus the trainers and the noise they add."""

from __future__ import annotations

import numpy as np
import pytest

from privbench import models
from privbench.training import make_trainer

BATCH = 4
TOLERANCE = 1e-4


def _clip_between(per_example: list[np.ndarray]) -> float:
    """A clip norm strictly between the 2nd and 3rd smallest per-example norms."""
    norms = np.sort([np.linalg.norm(g) for g in per_example])
    low, high = norms[1:3]
    assert low < high, "per-example gradient norms must differ"
    return float(np.sqrt(low * high))


def _naive_clipped_sum(per_example: list[np.ndarray], clip: float) -> np.ndarray:
    return sum(g * min(1.0, clip / np.linalg.norm(g)) for g in per_example)


def _assert_matches(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal to TOLERANCE relative to the gradient's scale: every coordinate
    within TOLERANCE of the largest one, and TOLERANCE in L2 (coordinate-wise
    relative error is meaningless for float32 coordinates near zero)."""
    assert actual.shape == expected.shape
    error = np.abs(actual - expected)
    assert error.max() <= TOLERANCE * np.abs(expected).max(), error.max()
    assert np.linalg.norm(error) <= TOLERANCE * np.linalg.norm(expected)


# --------------------------------------------------------------------------- PyTorch

def _torch_flat(tensors) -> np.ndarray:
    return np.concatenate([t.detach().cpu().numpy().ravel() for t in tensors])


def _check_torch(module, loss_fn, inputs, targets) -> dict:
    """Fast clipped sum == naive one; returns the clipper's description."""
    from privbench.dp.fast_torch import FastClipper

    params = [p for p in module.parameters() if p.requires_grad]
    per_example = []
    for i in range(len(targets)):
        module.zero_grad(set_to_none=True)
        loss_fn(module(*(x[i : i + 1] for x in inputs)), targets[i : i + 1]).backward()
        per_example.append(_torch_flat(p.grad for p in params))
    module.zero_grad(set_to_none=True)
    clip = _clip_between(per_example)

    clipper = FastClipper(module, clip)
    try:
        description = clipper.describe(loss_fn, inputs, targets)
        sums, _ = clipper.clipped_grad_sum(loss_fn, inputs, targets)
    finally:
        clipper.remove()
    _assert_matches(_torch_flat(sums), _naive_clipped_sum(per_example, clip))
    assert all(p.grad is None for p in params), "the fast path must not touch .grad"
    return description


@pytest.mark.parametrize("size", ["tiny", "small"])
@pytest.mark.parametrize("model", models.MODELS)
def test_fast_torch_matches_naive(model, size):
    family = models.family(model)
    module = models.build("torch", model, size, seed=0)
    inputs, targets = family.synthetic_batch(size, BATCH, "torch", seed=1)
    description = _check_torch(module, family.loss_torch, inputs, targets)
    assert description["dp_fallback"] == []  # every layer of the matrix has its own rule


def test_fast_torch_matches_naive_on_efficientnet_b0():
    import torch
    import torch.nn.functional as F

    from privbench.training.cifar import build_model

    module = build_model("opacus", seed=0)  # GroupNorm, SiLU out of place
    # Dropout and stochastic depth off, so that the naive loop sees the same
    # network; the residual `result += input` then changes a GroupNorm output in place.
    module.eval()
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 100, (BATCH,), generator=generator)
    description = _check_torch(module, F.cross_entropy, (images,), labels)
    methods = " ".join(description["dp_layers"])
    assert description["dp_fallback"] == []
    assert all(f": {m}" in methods for m in ("ghost", "direct", "stored"))
    assert description["dp_copied"]


def _torch_zoo():
    """A model taking every route of privbench.dp.fast_torch and both fallbacks."""
    import torch
    from torch import nn

    class Scale(nn.Module):  # a leaf without a rule: per-example vjp
        def __init__(self, n):
            super().__init__()
            self.gain = nn.Parameter(torch.linspace(0.5, 1.5, n))

        def forward(self, x):
            return x * self.gain

    class Zoo(nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens = nn.Embedding(11, 6, padding_idx=0)
            self.seq = nn.Conv1d(6, 8, 3, padding="same", groups=2)  # grouped, string padding
            self.reflect = nn.Conv1d(8, 8, 3, padding=1, padding_mode="reflect")
            self.depthwise = nn.Conv1d(8, 16, 5, padding=2, groups=8)  # channel multiplier 2
            self.wide = nn.Conv2d(4, 32, 3, padding=1, stride=2)  # few positions, many channels: ghost
            self.volume = nn.Conv3d(1, 2, 2)
            self.norm = nn.GroupNorm(2, 16)
            self.layer_norm = nn.LayerNorm(16)
            self.scale = Scale(16)
            self.relu = nn.ReLU(inplace=True)  # changes layer_norm's output in place
            self.shared = nn.Linear(16, 16)  # called twice: per-example vjp
            self.head = nn.Linear(16 + 32 + 2, 3)
            self.offset = nn.Parameter(torch.zeros(3))  # owned by a non-leaf: whole-model fallback

        def forward(self, tokens, image):
            x = self.tokens(tokens).transpose(1, 2)  # (B, 6, T)
            x = self.depthwise(torch.tanh(self.reflect(self.seq(x))))
            x = self.norm(x).transpose(1, 2)  # (B, T, 16)
            x = self.shared(torch.tanh(self.shared(self.scale(self.relu(self.layer_norm(x))))))
            wide = self.wide(image)
            wide += 1.0  # in place on a layer output, as a residual `out += x`
            wide = wide.mean(dim=(2, 3))
            volume = self.volume(image.unsqueeze(1)).mean(dim=(2, 3, 4))
            return self.head(torch.cat([x.mean(dim=1), wide, volume], dim=1)) + self.offset

    torch.manual_seed(0)
    return Zoo()


def test_fast_torch_every_route_and_fallback():
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 11, (BATCH, 7), generator=generator)
    tokens[0, :3] = 0  # padding positions get no gradient
    image = torch.randn(BATCH, 4, 4, 4, generator=generator)
    labels = torch.randint(0, 3, (BATCH,), generator=generator)
    description = _check_torch(_torch_zoo(), F.cross_entropy, (tokens, image), labels)
    layers = dict(line.split(": ") for line in description["dp_layers"])
    assert layers["wide (Conv2d)"] == "ghost"
    assert layers["tokens (Embedding)"] == "segment"
    assert layers["scale (Scale)"] == "vjp"
    assert layers["shared (Linear)"] == "vjp"
    assert "offset: whole_model" in description["dp_fallback"]
    assert {"direct", "stored"} <= set(layers.values())
    assert sorted(description["dp_copied"]) == ["layer_norm", "wide"]


def test_fast_torch_refuses_inputs_changed_in_place():
    import torch
    from torch import nn

    from privbench.dp.fast_torch import clipped_grad_sum_fast_torch

    class Overwrite(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, x):
            h = x * 2
            y = self.linear(h)
            h.zero_()  # the ordinary backward pass would fail on this too
            return y

    with pytest.raises(RuntimeError, match="inputs of layer 'linear' changed in place"):
        clipped_grad_sum_fast_torch(Overwrite(), nn.functional.mse_loss, (torch.randn(BATCH, 3),),
                                    torch.randn(BATCH, 2), 1.0)


def test_fast_torch_trainer_noise_std_on_mean_gradient():
    """With a negligible clip norm the gradient handed to AdamW is pure noise
    of std noise_std, as in the clipped mode."""
    trainer = make_trainer("torch", "cnn", "tiny", "fast_dp", batch_size=8,
                           settings={"l2_clip_norm": 1e-6})
    trainer.step()
    noisy = _torch_flat(p.grad for p in trainer._module.parameters())
    assert noisy.std() == pytest.approx(0.1, rel=0.1)


def test_fast_torch_empty_batch_is_a_noise_only_update():
    """Poisson sampling can draw an empty batch: the update is the noise alone
    over the expected batch size, as in Opacus."""
    import torch

    from privbench.dp.fast_torch import make_private_fast

    module = models.build("torch", "cnn", "tiny", seed=0)
    params = list(module.parameters())
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=1.0)
    dp = make_private_fast(module, optimizer, max_grad_norm=2.0, noise_multiplier=0.5, expected_batch_size=4,
                           noise_generator=torch.Generator().manual_seed(0))
    inputs, targets = models.family("cnn").synthetic_batch("tiny", BATCH, "torch", seed=1)
    loss = dp.step(models.family("cnn").loss_torch, tuple(x[:0] for x in inputs), targets[:0])
    assert torch.isnan(loss)
    noise = _torch_flat(b - p for b, p in zip(before, params))  # lr 1: the step is the gradient
    assert noise.std() == pytest.approx(0.5 * 2.0 / 4, rel=0.1)
    assert abs(noise.mean()) < 0.05


# --------------------------------------------------------------------------- JAX

def _jax_flat(tree) -> np.ndarray:
    import jax

    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def _check_jax(module, loss_fn, inputs, targets) -> dict:
    from flax import nnx

    from privbench.dp.fast_jax import FastClippedGrad, clipped_grad_sum_fast_jax

    example_grad = nnx.jit(nnx.grad(lambda m, x, y: loss_fn(m(*x), y)))
    per_example = [
        _jax_flat(example_grad(module, tuple(x[i : i + 1] for x in inputs), targets[i : i + 1]))
        for i in range(len(targets))
    ]
    clip = _clip_between(per_example)
    actual = _jax_flat(clipped_grad_sum_fast_jax(module, loss_fn, inputs, targets, clip))
    _assert_matches(actual, _naive_clipped_sum(per_example, clip))
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    return FastClippedGrad(graphdef, loss_fn, clip).describe(params, rest, inputs, targets)


@pytest.mark.parametrize("size", ["tiny", "small"])
@pytest.mark.parametrize("model", models.MODELS)
def test_fast_jax_matches_naive(model, size):
    family = models.family(model)
    module = models.build("jax", model, size, seed=0)
    inputs, targets = family.synthetic_batch(size, BATCH, "jax", seed=1)
    description = _check_jax(module, family.loss_jax, inputs, targets)
    assert description["dp_fallback"] == []  # every layer of the matrix has its own rule
    if (model, size) == ("state_space", "small"):  # the long depthwise convolution takes the FFT route
        assert "blocks.0.conv (Conv): fft" in description["dp_layers"]


def _jax_zoo():
    """A model taking every route of privbench.dp.fast_jax and both fallbacks."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    class Zoo(nnx.Module):
        def __init__(self, rngs):
            self.tokens = nnx.Embed(11, 8, rngs=rngs)
            self.causal = nnx.Conv(8, 8, (40,), feature_group_count=8, padding="CAUSAL", rngs=rngs)
            self.grouped = nnx.Conv(8, 8, (3,), feature_group_count=2, rngs=rngs)
            self.wide = nnx.Conv(4, 32, (3, 3), strides=2, rngs=rngs)  # few positions: ghost
            self.norm = nnx.GroupNorm(8, num_groups=2, rngs=rngs)
            self.mix = nnx.Einsum("btd,df->btf", (8, 8), (8,), rngs=rngs)  # no rule: vjp
            self.shared = nnx.Linear(8, 8, rngs=rngs)  # called twice: vjp
            self.head = nnx.Linear(8 + 32, 3, rngs=rngs)
            self.offset = nnx.Param(jnp.zeros(3))  # owned by a non-leaf: whole-model fallback

        def __call__(self, tokens, image):
            x = self.grouped(jnp.tanh(self.causal(self.tokens(tokens))))
            x = self.shared(jnp.tanh(self.shared(self.mix(self.norm(x)))))
            wide = self.wide(image).mean(axis=(1, 2))
            return self.head(jnp.concatenate([x.mean(axis=1), wide], axis=1)) + self.offset

    return Zoo(nnx.Rngs(0))


def test_fast_jax_every_route_and_fallback():
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
    assert layers["wide (Conv)"] == "ghost"
    assert layers["tokens (Embed)"] == "segment"
    assert layers["norm (GroupNorm)"] == "stored"
    assert layers["mix (Einsum)"] == "vjp"
    assert layers["shared (Linear)"] == "vjp"
    assert "offset: whole_model" in description["dp_fallback"]
    assert {"direct", "stored"} & set(layers.values())


# --------------------------------------------------------------------------- both trainers

@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_fast_dp_trainer_trains_and_describes_its_layers(framework):
    trainer = make_trainer(framework, "transformer", "tiny", "fast_dp", batch_size=8)
    before = trainer.param_arrays()
    for _ in range(2):
        trainer.sync(trainer.step())
    after = trainer.param_arrays()
    assert all(np.all(np.isfinite(a)) for a in after)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))
    description = trainer.description
    assert description["mode"] == "fast_dp"
    assert description["noise_std_effective"] == pytest.approx(0.1)
    assert description["l2_clip_norm"] == 1.0
    assert description["dp_fallback"] == []
    assert any(line.startswith("tokens (Embed") for line in description["dp_layers"])


def test_fast_dp_takes_no_microbatch_size():
    with pytest.raises(ValueError, match="not supported for jax fast_dp"):
        make_trainer("jax", "cnn", "tiny", "fast_dp", batch_size=8, microbatch_size=2)
