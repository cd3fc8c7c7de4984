"""CNN image classifier.

Per entry of ``features``: Conv 3x3 SAME -> ReLU -> max-pool 2x2 stride 2;
then flatten -> Linear(hidden) -> ReLU -> Linear(num_classes). Trained with
cross-entropy on random labels. JAX takes NHWC images, PyTorch NCHW.

Variants (privbench.models.VARIANTS): the published PyTorch CNN runs its
convolutions on channels-last images (the original made its images NHWC and
viewed them as NCHW, so torch picked its channels-last kernels); harmonized
keeps torch's contiguous NCHW. The JAX CNN is the same in both.
"""

from __future__ import annotations

import functools

import numpy as np

from privbench.models import PUBLISHED, UnknownModelError

# ``input_shape`` is (height, width, channels), the JAX (NHWC) layout.
SIZES = {
    "tiny": {"input_shape": (8, 8, 3), "features": (4, 8), "hidden": 16, "num_classes": 10},
    "small": {"input_shape": (32, 32, 3), "features": (32, 64), "hidden": 256, "num_classes": 10},
    "medium": {"input_shape": (64, 64, 3), "features": (64, 128, 256), "hidden": 1024,
               "num_classes": 10},
    "large": {"input_shape": (128, 128, 3), "features": (64, 128, 256, 512, 512), "hidden": 4096,
              "num_classes": 10},
}

PUBLISHED_PARAMS = {"small": 1_070_794, "medium": 17_159_306, "large": 37_510_282}


def _flat_features(input_shape, features) -> int:
    """Width of the flattened feature map: every stage halves height and width."""
    height, width, _ = input_shape
    scale = 2 ** len(features)
    return (height // scale) * (width // scale) * features[-1]


@functools.cache
def torch_class():
    import torch
    from torch import nn

    class CNN(nn.Module):
        def __init__(self, input_shape, features, hidden, num_classes, variant):
            super().__init__()
            self.channels_last = variant == PUBLISHED
            layers = []
            channels = input_shape[2]
            for out in features:
                layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2)]
                channels = out
            layers += [
                nn.Flatten(),
                nn.Linear(_flat_features(input_shape, features), hidden),
                nn.ReLU(),
                nn.Linear(hidden, num_classes),
            ]
            self.layers = nn.Sequential(*layers)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            if self.channels_last:  # a no-op for images already stored channels-last
                images = images.contiguous(memory_format=torch.channels_last)
            return self.layers(images)

    return CNN


@functools.cache
def jax_class():
    import jax
    from flax import nnx

    class CNN(nnx.Module):
        def __init__(self, input_shape, features, hidden, num_classes, variant, *, rngs: nnx.Rngs):
            channels = [input_shape[2], *features]
            self.convs = nnx.List(
                nnx.Conv(c_in, c_out, (3, 3), padding="SAME", rngs=rngs)
                for c_in, c_out in zip(channels[:-1], channels[1:])
            )
            self.hidden = nnx.Linear(_flat_features(input_shape, features), hidden, rngs=rngs)
            self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

        def __call__(self, images: jax.Array) -> jax.Array:
            x = images
            for conv in self.convs:
                x = nnx.max_pool(jax.nn.relu(conv(x)), (2, 2), strides=(2, 2))
            x = x.reshape(x.shape[0], -1)
            return self.head(jax.nn.relu(self.hidden(x)))

    return CNN


def loss_torch(outputs, targets):
    import torch.nn.functional as F

    return F.cross_entropy(outputs, targets)


def loss_jax(outputs, targets):
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(outputs, targets).mean()


def synthetic_batch(size: str, batch_size: int, framework: str, seed: int):
    """Standard-normal images and uniform labels, the same numbers in both frameworks."""
    spec = SIZES[size]
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch_size, *spec["input_shape"]), dtype=np.float32)
    labels = rng.integers(0, spec["num_classes"], batch_size)
    if framework == "jax":
        import jax.numpy as jnp

        return (jnp.asarray(images),), jnp.asarray(labels, dtype=jnp.int32)
    if framework == "torch":
        import torch

        nchw = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
        return (torch.from_numpy(nchw),), torch.from_numpy(labels.astype(np.int64))
    raise UnknownModelError(f"unknown framework {framework!r}: choose jax or torch")
