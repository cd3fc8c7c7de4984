"""Diffusion-style denoiser on small images.

conv3x3(3 -> H) plus a learned embedding of the timestep t (0..999) broadcast
over the image; ``layers`` x [conv3x3 -> GELU -> conv3x3 -> norm(h + x)];
conv3x3(H -> 3). Inputs are (image, t); regresses a random target image with
mean squared error. JAX takes NHWC images, PyTorch NCHW.

The block's norm and GELU per variant (privbench.models.VARIANTS); the norm
has 2H affine parameters in every variant, so the published counts hold:

    published   JAX: LayerNorm over the channels of each pixel (epsilon 1e-6),
                tanh GELU; torch: GroupNorm(8) (epsilon 1e-5), exact GELU
    harmonized  both: GroupNorm(norm_groups) (epsilon 1e-5), exact GELU
"""

from __future__ import annotations

import functools

import numpy as np

from privbench.models import (PUBLISHED, TORCH_NORM_EPS, UnknownModelError, jax_gelu_approximate,
                             jax_norm_eps)

NUM_TIMESTEPS = 1000

# ``input_shape`` is (height, width, channels), the JAX (NHWC) layout.
# ``norm_groups`` is the harmonized GroupNorm's: 32, the usual diffusion-model
# GroupNorm (and Flax's default); tiny has too few channels for 32.
SIZES = {
    "tiny": {"input_shape": (8, 8, 3), "hidden": 8, "layers": 1, "norm_groups": 4},
    "small": {"input_shape": (32, 32, 3), "hidden": 64, "layers": 2, "norm_groups": 32},
    "medium": {"input_shape": (32, 32, 3), "hidden": 128, "layers": 4, "norm_groups": 32},
    "large": {"input_shape": (32, 32, 3), "hidden": 256, "layers": 6, "norm_groups": 32},
}

PUBLISHED_PARAMS = {"small": 215_491, "medium": 1_316_739, "large": 7_354_115}

# The published PyTorch block's GroupNorm.
PUBLISHED_TORCH_GROUPS = 8


@functools.cache
def torch_class():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self, hidden, norm_groups):
            super().__init__()
            self.conv1 = nn.Conv2d(hidden, hidden, 3, padding=1)
            self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1)
            self.norm = nn.GroupNorm(norm_groups, hidden, eps=TORCH_NORM_EPS)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(x + self.conv2(F.gelu(self.conv1(x))))

    class Diffusion(nn.Module):
        def __init__(self, input_shape, hidden, layers, norm_groups, variant):
            super().__init__()
            groups = PUBLISHED_TORCH_GROUPS if variant == PUBLISHED else norm_groups
            channels = input_shape[2]
            self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
            self.time = nn.Embedding(NUM_TIMESTEPS, hidden)
            self.blocks = nn.ModuleList(Block(hidden, groups) for _ in range(layers))
            self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)

        def forward(self, images: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x = self.conv_in(images) + self.time(t)[:, :, None, None]
            for block in self.blocks:
                x = block(x)
            return self.conv_out(x)

    return Diffusion


@functools.cache
def jax_class():
    import jax
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, hidden, norm_groups, variant, *, rngs: nnx.Rngs):
            self.conv1 = nnx.Conv(hidden, hidden, (3, 3), padding="SAME", rngs=rngs)
            self.conv2 = nnx.Conv(hidden, hidden, (3, 3), padding="SAME", rngs=rngs)
            self.approximate = jax_gelu_approximate(variant)
            eps = jax_norm_eps(variant)
            if variant == PUBLISHED:  # normalises the last (channel) axis of each pixel
                self.norm = nnx.LayerNorm(hidden, epsilon=eps, rngs=rngs)
            else:
                # Statistics per example over (H, W, channel group): Flax takes the
                # leading axis as the batch, so inputs always carry one (jax-privacy
                # passes each example as a batch of one).
                self.norm = nnx.GroupNorm(hidden, num_groups=norm_groups, epsilon=eps, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.norm(x + self.conv2(jax.nn.gelu(self.conv1(x), approximate=self.approximate)))

    class Diffusion(nnx.Module):
        def __init__(self, input_shape, hidden, layers, norm_groups, variant, *, rngs: nnx.Rngs):
            channels = input_shape[2]
            self.conv_in = nnx.Conv(channels, hidden, (3, 3), padding="SAME", rngs=rngs)
            self.time = nnx.Embed(NUM_TIMESTEPS, hidden, rngs=rngs)
            self.blocks = nnx.List(Block(hidden, norm_groups, variant, rngs=rngs) for _ in range(layers))
            self.conv_out = nnx.Conv(hidden, channels, (3, 3), padding="SAME", rngs=rngs)

        def __call__(self, images: jax.Array, t: jax.Array) -> jax.Array:
            x = self.conv_in(images) + self.time(t)[:, None, None, :]
            for block in self.blocks:
                x = block(x)
            return self.conv_out(x)

    return Diffusion


def loss_torch(outputs, targets):
    import torch.nn.functional as F

    return F.mse_loss(outputs, targets)


def loss_jax(outputs, targets):
    import jax.numpy as jnp

    return jnp.mean((outputs - targets) ** 2)


def synthetic_batch(size: str, batch_size: int, framework: str, seed: int):
    """Standard-normal images and targets, uniform timesteps; the same numbers in
    both frameworks."""
    spec = SIZES[size]
    rng = np.random.default_rng(seed)
    shape = (batch_size, *spec["input_shape"])
    images = rng.standard_normal(shape, dtype=np.float32)
    t = rng.integers(0, NUM_TIMESTEPS, batch_size)
    targets = rng.standard_normal(shape, dtype=np.float32)
    if framework == "jax":
        import jax.numpy as jnp

        inputs = (jnp.asarray(images), jnp.asarray(t, dtype=jnp.int32))
        return inputs, jnp.asarray(targets)
    if framework == "torch":
        import torch

        def nchw(x):
            return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

        return (nchw(images), torch.from_numpy(t.astype(np.int64))), nchw(targets)
    raise UnknownModelError(f"unknown framework {framework!r}: choose jax or torch")
