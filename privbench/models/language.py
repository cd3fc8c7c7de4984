"""What the language-model families (Transformer, StateSpace) share: next-token
cross-entropy and a batch of random tokens, the same numbers in both frameworks."""

from __future__ import annotations

import numpy as np

from privbench.models import UnknownModelError


def loss_torch(outputs, targets):
    import torch.nn.functional as F

    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))


def loss_jax(outputs, targets):
    import optax

    logits = outputs.reshape(-1, outputs.shape[-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets.reshape(-1)).mean()


def synthetic_batch(spec: dict, batch_size: int, framework: str, seed: int):
    """Uniform random input and target tokens for a size's ``seq_len`` and ``vocab_size``."""
    rng = np.random.default_rng(seed)
    shape = (batch_size, spec["seq_len"])
    tokens = rng.integers(0, spec["vocab_size"], shape)
    targets = rng.integers(0, spec["vocab_size"], shape)
    if framework == "jax":
        import jax.numpy as jnp

        return (jnp.asarray(tokens, dtype=jnp.int32),), jnp.asarray(targets, dtype=jnp.int32)
    if framework == "torch":
        import torch

        def as_long(x):
            return torch.from_numpy(x.astype(np.int64))

        return (as_long(tokens),), as_long(targets)
    raise UnknownModelError(f"unknown framework {framework!r}: choose jax or torch")
