"""S4-like long-convolution language model.

Token embedding (no position embedding: the causal convolution sees order);
``layers`` x [LN -> causal depthwise Conv1D (kernel = seq_len, one filter per
channel, with bias) -> GELU -> Linear(H) -> residual]; final LN -> lm_head
(with bias). Predicts random tokens with cross-entropy.

The convolution is a real ``nn.Conv1d`` (groups = hidden) so that Opacus
measures its own convolution grad sampler; causality comes from padding
seq_len - 1 steps on the left and convolving VALID.

Variants (privbench.models.VARIANTS): the published JAX model keeps Flax's
defaults (LayerNorm epsilon 1e-6, tanh GELU); harmonized gives it torch's
(epsilon 1e-5, exact GELU). The PyTorch model is the same in both.
"""

from __future__ import annotations

import functools

from privbench.models import TORCH_NORM_EPS, jax_gelu_approximate, jax_norm_eps, language

SIZES = {
    "tiny": {"vocab_size": 50, "hidden": 16, "layers": 1, "seq_len": 8},
    "small": {"vocab_size": 1000, "hidden": 256, "layers": 2, "seq_len": 256},
    "medium": {"vocab_size": 1000, "hidden": 384, "layers": 6, "seq_len": 256},
    "large": {"vocab_size": 30000, "hidden": 768, "layers": 12, "seq_len": 256},
}

PUBLISHED_PARAMS = {"small": 777_704, "medium": 2_253_544, "large": 55_585_584}


@functools.cache
def torch_class():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self, hidden, seq_len):
            super().__init__()
            self.ln = nn.LayerNorm(hidden, eps=TORCH_NORM_EPS)
            self.conv = nn.Conv1d(hidden, hidden, kernel_size=seq_len, groups=hidden)
            self.proj = nn.Linear(hidden, hidden)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.ln(x).transpose(1, 2)  # (B, H, T): Conv1d is channels-first
            h = F.pad(h, (self.conv.kernel_size[0] - 1, 0))
            h = F.gelu(self.conv(h)).transpose(1, 2)
            return x + self.proj(h)

    class StateSpace(nn.Module):
        def __init__(self, vocab_size, hidden, layers, seq_len, variant):
            super().__init__()
            self.tokens = nn.Embedding(vocab_size, hidden)
            self.blocks = nn.ModuleList(Block(hidden, seq_len) for _ in range(layers))
            self.ln_final = nn.LayerNorm(hidden, eps=TORCH_NORM_EPS)
            self.lm_head = nn.Linear(hidden, vocab_size)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            x = self.tokens(tokens)
            for block in self.blocks:
                x = block(x)
            return self.lm_head(self.ln_final(x))

    return StateSpace


@functools.cache
def jax_class():
    import jax
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, hidden, seq_len, variant, *, rngs: nnx.Rngs):
            self.approximate = jax_gelu_approximate(variant)
            self.ln = nnx.LayerNorm(hidden, epsilon=jax_norm_eps(variant), rngs=rngs)
            # Padding (seq_len - 1, 0) on the time axis is the left pad + VALID
            # convolution of the PyTorch version, done inside the conv.
            self.conv = nnx.Conv(hidden, hidden, kernel_size=(seq_len,),
                                 feature_group_count=hidden, padding=((seq_len - 1, 0),),
                                 rngs=rngs)
            self.proj = nnx.Linear(hidden, hidden, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            h = jax.nn.gelu(self.conv(self.ln(x)), approximate=self.approximate)
            return x + self.proj(h)

    class StateSpace(nnx.Module):
        def __init__(self, vocab_size, hidden, layers, seq_len, variant, *, rngs: nnx.Rngs):
            self.tokens = nnx.Embed(vocab_size, hidden, rngs=rngs)
            self.blocks = nnx.List(Block(hidden, seq_len, variant, rngs=rngs) for _ in range(layers))
            self.ln_final = nnx.LayerNorm(hidden, epsilon=jax_norm_eps(variant), rngs=rngs)
            self.lm_head = nnx.Linear(hidden, vocab_size, rngs=rngs)

        def __call__(self, tokens: jax.Array) -> jax.Array:
            x = self.tokens(tokens)
            for block in self.blocks:
                x = block(x)
            return self.lm_head(self.ln_final(x))

    return StateSpace


loss_torch = language.loss_torch
loss_jax = language.loss_jax


def synthetic_batch(size: str, batch_size: int, framework: str, seed: int):
    """Uniform random input and target tokens, the same numbers in both frameworks."""
    return language.synthetic_batch(SIZES[size], batch_size, framework, seed)
