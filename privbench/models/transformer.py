"""Decoder-only Transformer language model (pre-LN, no dropout).

Token embedding + learned position embedding; ``layers`` x [LN -> causal
multi-head attention with biases -> residual; LN -> Linear(4H) -> GELU ->
Linear(H) -> residual]; final LN -> lm_head (with bias, not tied to the token
embedding). Predicts random tokens with cross-entropy.

Attention is built from plain Linear layers (q, k, v and output projections,
with biases) so that Opacus' hooks compute every per-sample gradient with its
Linear grad sampler. The position embedding is an Embedding layer, not a bare
parameter, for the same reason.

Variants (privbench.models.VARIANTS), with the same parameters:

    published   separate q, k, v projections in both frameworks; JAX keeps
                Flax's defaults (LayerNorm epsilon 1e-6, tanh GELU) and runs
                q, k, v in bfloat16 through JAX's fused causal attention
                (``jax.nn.dot_product_attention``: cuDNN on a GPU), the output
                back in float32; torch: float32, epsilon 1e-5, exact GELU
    harmonized  one fused q/k/v projection, float32 attention, epsilon 1e-5 and
                exact GELU in both frameworks
"""

from __future__ import annotations

import functools


from privbench.models import PUBLISHED, TORCH_NORM_EPS, jax_gelu_approximate, jax_norm_eps, language

SIZES = {
    "tiny": {"vocab_size": 50, "hidden": 16, "heads": 2, "layers": 1, "seq_len": 8},
    "small": {"vocab_size": 1000, "hidden": 256, "heads": 4, "layers": 2, "seq_len": 256},
    "medium": {"vocab_size": 1000, "hidden": 384, "heads": 8, "layers": 6, "seq_len": 256},
    "large": {"vocab_size": 30000, "hidden": 768, "heads": 12, "layers": 12, "seq_len": 256},
}

PUBLISHED_PARAMS = {"small": 2_158_568, "medium": 11_514_856, "large": 131_362_608}


@functools.cache
def torch_class():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self, hidden, heads, variant):
            super().__init__()
            self.heads = heads
            self.ln_attn = nn.LayerNorm(hidden, eps=TORCH_NORM_EPS)
            if variant == PUBLISHED:
                self.q, self.k, self.v = (nn.Linear(hidden, hidden) for _ in range(3))
            else:
                self.qkv = nn.Linear(hidden, 3 * hidden)
            self.attn_out = nn.Linear(hidden, hidden)
            self.ln_mlp = nn.LayerNorm(hidden, eps=TORCH_NORM_EPS)
            self.mlp_in = nn.Linear(hidden, 4 * hidden)
            self.mlp_out = nn.Linear(4 * hidden, hidden)

        def attention(self, x: torch.Tensor) -> torch.Tensor:
            batch, length, hidden = x.shape
            qkv = self.qkv(x).chunk(3, dim=-1) if hasattr(self, "qkv") else (self.q(x), self.k(x), self.v(x))
            # each (B, T, H) -> (B, heads, T, head_dim)
            q, k, v = (t.view(batch, length, self.heads, hidden // self.heads).transpose(1, 2) for t in qkv)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.attn_out(y.transpose(1, 2).reshape(batch, length, hidden))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.attention(self.ln_attn(x))
            return x + self.mlp_out(F.gelu(self.mlp_in(self.ln_mlp(x))))

    class Transformer(nn.Module):
        def __init__(self, vocab_size, hidden, heads, layers, seq_len, variant):
            super().__init__()
            self.tokens = nn.Embedding(vocab_size, hidden)
            self.positions = nn.Embedding(seq_len, hidden)
            self.blocks = nn.ModuleList(Block(hidden, heads, variant) for _ in range(layers))
            self.ln_final = nn.LayerNorm(hidden, eps=TORCH_NORM_EPS)
            self.lm_head = nn.Linear(hidden, vocab_size)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            batch, length = tokens.shape
            # Positions carry the batch dimension: Opacus' Embedding grad
            # sampler needs one row of indices per example, and its norm
            # sampler (ghost clipping) views them, so they must be contiguous.
            positions = torch.arange(length, device=tokens.device).expand(batch, length).contiguous()
            x = self.tokens(tokens) + self.positions(positions)
            for block in self.blocks:
                x = block(x)
            return self.lm_head(self.ln_final(x))

    return Transformer


@functools.cache
def jax_class():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, hidden, heads, variant, *, rngs: nnx.Rngs):
            self.heads = heads
            self.approximate = jax_gelu_approximate(variant)
            # The published attention: q, k, v in bfloat16, JAX's fused kernel.
            self.attention_dtype = jnp.bfloat16 if variant == PUBLISHED else jnp.float32
            eps = jax_norm_eps(variant)
            self.ln_attn = nnx.LayerNorm(hidden, epsilon=eps, rngs=rngs)
            if variant == PUBLISHED:
                self.q, self.k, self.v = (nnx.Linear(hidden, hidden, rngs=rngs) for _ in range(3))
            else:
                self.qkv = nnx.Linear(hidden, 3 * hidden, rngs=rngs)
            self.attn_out = nnx.Linear(hidden, hidden, rngs=rngs)
            self.ln_mlp = nnx.LayerNorm(hidden, epsilon=eps, rngs=rngs)
            self.mlp_in = nnx.Linear(hidden, 4 * hidden, rngs=rngs)
            self.mlp_out = nnx.Linear(4 * hidden, hidden, rngs=rngs)

        def attention(self, x: jax.Array) -> jax.Array:
            batch, length, hidden = x.shape
            qkv = jnp.split(self.qkv(x), 3, axis=-1) if hasattr(self, "qkv") else (self.q(x), self.k(x), self.v(x))
            # each (B, T, H) -> (B, T, heads, head_dim)
            q, k, v = (t.reshape(batch, length, self.heads, hidden // self.heads).astype(self.attention_dtype)
                       for t in qkv)
            y = jax.nn.dot_product_attention(q, k, v, is_causal=True).astype(x.dtype)
            return self.attn_out(y.reshape(batch, length, hidden))

        def __call__(self, x: jax.Array) -> jax.Array:
            x = x + self.attention(self.ln_attn(x))
            h = jax.nn.gelu(self.mlp_in(self.ln_mlp(x)), approximate=self.approximate)
            return x + self.mlp_out(h)

    class Transformer(nnx.Module):
        def __init__(self, vocab_size, hidden, heads, layers, seq_len, variant, *, rngs: nnx.Rngs):
            self.tokens = nnx.Embed(vocab_size, hidden, rngs=rngs)
            self.positions = nnx.Embed(seq_len, hidden, rngs=rngs)
            self.blocks = nnx.List(Block(hidden, heads, variant, rngs=rngs) for _ in range(layers))
            self.ln_final = nnx.LayerNorm(hidden, epsilon=jax_norm_eps(variant), rngs=rngs)
            self.lm_head = nnx.Linear(hidden, vocab_size, rngs=rngs)

        def __call__(self, tokens: jax.Array) -> jax.Array:
            x = self.tokens(tokens) + self.positions(jnp.arange(tokens.shape[1]))
            for block in self.blocks:
                x = block(x)
            return self.lm_head(self.ln_final(x))

    return Transformer


loss_torch = language.loss_torch
loss_jax = language.loss_jax


def synthetic_batch(size: str, batch_size: int, framework: str, seed: int):
    """Uniform random input and target tokens, the same numbers in both frameworks."""
    return language.synthetic_batch(SIZES[size], batch_size, framework, seed)
