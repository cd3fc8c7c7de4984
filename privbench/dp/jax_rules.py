"""Per-layer rules of the JAX DP-SGD engine (:mod:`privbench.dp.jax_engine`).

One unit per layer family, in the Opacus style, holding together what the
engine needs of a layer:

- ``route(layer, info, shapes)``: the route label for these shapes, chosen by
  the shared cost model :mod:`privbench.dp.cost` (``None``: the rule does not
  apply, the layer takes the ``vjp`` fallback). ``shapes`` holds the shapes,
  batch first and each example a batch of one, of the layer's first
  positional argument ``"x"``, its output ``"out"`` and, for a convolution,
  the input as the convolution primitive sees it ``"lhs"``;
- ``work(layer, info, params, records, grads, route)``: from the layer's recorded
  per-example inputs and output gradients (batch first), the squared norms of
  every example's parameter gradients and what the clipped sum needs (a
  :class:`Work`: per-example gradients kept, or a book-keeping product).

The registry :data:`RULES` maps a layer type (exactly: a subclass may compute
something else) to its rule. JAX forms whole (untiled) Gram matrices, so the
cost model is asked with its default ``tile=None``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from privbench.dp import cost

# Route labels: cost.Route.label's ("gram", "direct", "kept", "fft"), the norm forms of
# Embed and of the norm layers, and the two fallbacks.
SEGMENT, ELEMENTWISE = cost.SEGMENT, cost.ELEMENTWISE
KEPT = cost.Route(cost.DIRECT, keep=True).label
VJP_FALLBACK, WHOLE_MODEL_FALLBACK = "vjp", "whole_model"


@dataclass
class LayerInfo:
    """What the shape trace learned about one tapped layer (static, no arrays)."""

    layer_type: type
    calls: int = 0
    array_args: bool = True
    conv: dict | None = None  # the lax.conv_general_dilated arguments, lhs and rhs aside


@dataclass
class Work:
    """One layer's part of the clipped gradient: its per-example squared norms,
    and its clipped sums from the clip factors, from the per-example gradients
    kept (``per_example``: parameter name -> (B, *shape)) or by book-keeping
    (``bookkeeping``: factors -> {parameter name: clipped sum})."""

    sq_norms: jax.Array
    per_example: dict = field(default_factory=dict)
    bookkeeping: Callable | None = None

    def clipped_sums(self, factors: jax.Array) -> dict:
        """parameter name -> sum_n factors[n] * grad_n."""
        sums = {name: jnp.tensordot(factors, g, axes=1) for name, g in self.per_example.items()}
        if self.bookkeeping is not None:
            sums.update(self.bookkeeping(factors))
        return sums


# --------------------------------------------------------------------------- shared algebra

def sq_norms(x: jax.Array) -> jax.Array:
    """Squared L2 norm of each example's slice of ``x`` (batch first)."""
    return jnp.sum(jnp.square(x).reshape(x.shape[0], -1), axis=1)


def _scale(g: jax.Array, factors: jax.Array) -> jax.Array:
    return g * factors.reshape((-1,) + (1,) * (g.ndim - 1))


def _gram_sq_norms(a: jax.Array, g: jax.Array) -> jax.Array:
    """<A A^T, G G^T> per example for a (B, ..., T, d), g (B, ..., T, p): the
    squared norm of each A^T G without forming it."""
    grams = jnp.einsum("...td,...sd->...ts", a, a) * jnp.einsum("...tp,...sp->...ts", g, g)
    return jnp.sum(grams.reshape(grams.shape[0], -1), axis=1)


def _with_bias(work: Work, params: dict, g_rows: jax.Array) -> Work:
    """Adds the bias's per-example gradient (its output gradient summed over
    the rows of ``g_rows``: (B, T, p)), always kept: it is small."""
    if "bias" in params:
        work.per_example["bias"] = g_rows.sum(axis=1)
        work.sq_norms += sq_norms(work.per_example["bias"])
    return work


def layer_vjp(layer, records: list, grads: list) -> Work:
    """Per-example gradients of a leaf layer's parameters, summed over its
    calls: the vjp of the layer on each example's recorded arguments (the
    ``vjp`` fallback, and the ``elementwise`` route of the norm layers)."""
    layer_def, layer_params, layer_rest = nnx.split(layer, nnx.Param, ...)
    total = None
    for record, g in zip(records, grads):
        def one(args, kwargs, g_i):
            def apply(p):
                return nnx.merge(layer_def, p, layer_rest)(*args, **kwargs)

            return jax.vjp(apply, layer_params)[1](g_i)[0]

        per_example = jax.vmap(one)(record["args"], record["kwargs"], g)
        total = per_example if total is None else jax.tree.map(jnp.add, total, per_example)
    flat = {path[0]: value for path, value in nnx.to_flat_state(total)}
    per_example = {name: value[...] if isinstance(value, nnx.Variable) else value
                   for name, value in flat.items()}
    return Work(sum(sq_norms(v) for v in per_example.values()), per_example=per_example)


# --------------------------------------------------------------------------- rules

class LayerRule(Protocol):
    """The interface of one layer family's rule (see the module docstring)."""

    def route(self, layer, info: LayerInfo, shapes: dict) -> str | None: ...

    def work(self, layer, info: LayerInfo, params: dict, records: list, grads: list, route: str) -> Work: ...


class LinearRule:
    """nnx.Linear (plain dot_general, one call): ``gram``, ``direct`` or ``kept``."""

    def route(self, layer, info: LayerInfo, shapes: dict) -> str | None:
        if info.calls != 1 or layer.dot_general is not lax.dot_general or "x" not in shapes:
            return None
        d, p = layer.in_features, layer.out_features
        rows = math.prod(shapes["x"][1:]) // d
        # Book-keeping keeps the layer's input and output gradient: matmul_route's default.
        return cost.matmul_route(rows, d, p).label

    def work(self, layer, info: LayerInfo, params, records, grads, route) -> Work:
        x, g = records[0]["args"][0], grads[0]
        batch = x.shape[0]
        a = x.reshape(batch, -1, layer.in_features)
        g = g.reshape(batch, -1, layer.out_features)
        work = Work(jnp.zeros(batch, g.dtype))
        if route == cost.GRAM:
            work.sq_norms += _gram_sq_norms(a, g)
        else:
            per_example = jnp.einsum("btd,btp->bdp", a, g)
            work.sq_norms += sq_norms(per_example)
            if route == KEPT:
                work.per_example["kernel"] = per_example
        if "kernel" not in work.per_example:
            work.bookkeeping = lambda factors: {
                "kernel": jnp.einsum("btd,btp->dp", a, _scale(g, factors))}
        return _with_bias(work, params, g)


class ConvRule:
    """nnx.Conv (no mask, one call), any feature groups: ``gram`` over the
    patches (1-D, 2-D), ``direct``/``kept`` (the per-example kernel gradients:
    one matmul per kernel offset, or with feature groups or strides vmap of the
    convolution's vjp), ``fft`` (depthwise 1-D with a long kernel)."""

    def route(self, layer, info: LayerInfo, shapes: dict) -> str | None:
        if info.calls != 1 or layer.mask is not None or not info.conv:
            return None
        conv = info.conv
        _, rhs_spec, out_spec = conv["dimension_numbers"]
        kernel = math.prod(layer.kernel.shape[d] for d in rhs_spec[2:])
        out_shape = shapes["out"][1:]  # per example, a batch of one
        positions = math.prod(out_shape[d] for d in out_spec[2:])
        unit = conv["batch_group_count"] == 1 and _unit_strides(conv)
        # Book-keeping keeps the convolution's input and output gradient.
        kept_numel = math.prod(shapes["lhs"][1:]) + math.prod(out_shape)
        return cost.conv_route(positions, kernel, layer.in_features, layer.out_features,
                               conv["feature_group_count"], spatial_dims=len(rhs_spec) - 2,
                               unit_strides=unit, kept_numel=kept_numel,
                               fft_min_kernel=cost.FFT_MIN_KERNEL["jax"]).label

    def work(self, layer, info: LayerInfo, params, records, grads, route) -> Work:
        lhs, g = records[0]["lhs"], grads[0]  # (B, *per-example lhs with its batch of one)
        conv = info.conv
        kernel = params["kernel"]
        batch = lhs.shape[0]

        def convolve(lhs_i, k):
            return lax.conv_general_dilated(lhs_i, k, **conv)

        work = Work(jnp.zeros(batch, g.dtype))
        if route == cost.GRAM:
            work.sq_norms += _conv_gram_sq_norms(lhs, g, kernel.shape, conv)
        else:
            if route == cost.FFT:
                per_example = _depthwise_fft(lhs, g, kernel.shape, conv)
            elif _shifted_matmuls_apply(conv):
                per_example = _shifted_matmuls(lhs, g, kernel.shape, conv)
            else:
                per_example = jax.vmap(
                    lambda lhs_i, g_i: jax.vjp(lambda k: convolve(lhs_i, k), kernel)[1](g_i)[0])(lhs, g)
            work.sq_norms += sq_norms(per_example)
            if route in (KEPT, cost.FFT):
                work.per_example["kernel"] = per_example
        if "kernel" not in work.per_example:
            def bookkeeping(factors):
                batched = jax.vmap(convolve, in_axes=(0, None))
                return {"kernel": jax.vjp(lambda k: batched(lhs, k), kernel)[1](_scale(g, factors))[0]}

            work.bookkeeping = bookkeeping
        feature_last = jnp.moveaxis(g, 1 + conv["dimension_numbers"][2][1], -1)
        return _with_bias(work, params, feature_last.reshape(batch, -1, feature_last.shape[-1]))


def _channels_first(x: jax.Array, spec) -> jax.Array:
    """(B, *per-example array in layout ``spec``) -> (B, N, C, *spatial)."""
    return jnp.transpose(x, (0, *(1 + d for d in spec)))


def _channels_last(x: jax.Array, spec) -> jax.Array:
    """(B, *per-example array in layout ``spec``, its batch of one) -> (B, *spatial, C):
    one transpose (none for a channels-last layout) and a reshape, which XLA
    keeps cheaper than a transpose, an index and a second transpose."""
    x = jnp.transpose(x, (0, 1 + spec[0], *(1 + d for d in spec[2:]), 1 + spec[1]))
    return x.reshape(x.shape[0], *x.shape[2:])


def _conv_gram_sq_norms(lhs, g, kernel_shape, conv) -> jax.Array:
    """The Gram norm over the convolution's patches, one row per output
    position and each feature group its own linear map."""
    _, rhs_spec, out_spec = conv["dimension_numbers"]
    groups = conv["feature_group_count"]
    window = tuple(kernel_shape[d] for d in rhs_spec[2:])
    patches = jax.vmap(lambda x: lax.conv_general_dilated_patches(
        x, window, conv["window_strides"], conv["padding"], conv["lhs_dilation"],
        conv["rhs_dilation"], conv["dimension_numbers"], conv["precision"]))(lhs)
    batch = lhs.shape[0]
    # Patch features are ordered (input channel, *window): groups are contiguous.
    a = _channels_first(patches, out_spec)  # (B, 1, C_in * K, *spatial)
    a = a.reshape(batch, groups, -1, math.prod(a.shape[3:]))
    go = _channels_first(g, out_spec)
    go = go.reshape(batch, groups, -1, math.prod(go.shape[3:]))
    return _gram_sq_norms(jnp.swapaxes(a, 2, 3), jnp.swapaxes(go, 2, 3))


def _shifted_matmuls_apply(conv) -> bool:
    """Whether a convolution's per-example kernel gradients are formed by
    :func:`_shifted_matmuls` (one feature group, unit strides and dilations),
    not by vmap of its vjp: XLA CPU forms the latter 2-3x slower, measured on
    one core at batch 32 (32x32 pixels, 64 -> 64 channels: 265 vs 88 ms, the
    batch's kernel gradient 81 ms; 64 -> 3 channels: 29 vs 13 ms)."""
    return _unit_strides(conv) and conv["feature_group_count"] == 1 and conv["batch_group_count"] == 1


def _unit_strides(conv) -> bool:
    """Unit window strides and no dilation (of the input or of the kernel)."""
    return all(v in (None, 1) or all(s == 1 for s in v)
               for v in (conv["window_strides"], conv["lhs_dilation"], conv["rhs_dilation"]))


def _shifted_matmuls(lhs, g, kernel_shape, conv) -> jax.Array:
    """Per-example kernel gradients of a convolution with unit strides, one
    matmul per kernel offset k: w[k] = x_k^T g, x_k the padded input shifted by
    k over the output positions; a loop over examples (lax.map: XLA CPU's
    batched matmuls of these shapes are slower, 102 vs 88 ms at 64 -> 64
    channels). In the kernel's layout."""
    lhs_spec, rhs_spec, out_spec = conv["dimension_numbers"]
    window = tuple(kernel_shape[d] for d in rhs_spec[2:])
    x, go = _channels_last(lhs, lhs_spec), _channels_last(g, out_spec)  # (B, *spatial, C)
    padding = conv["padding"]
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(x.shape[1:-1], window, (1,) * len(window), padding)
    out_spatial = go.shape[1:-1]

    # The product with the fewer rows first: g^T x_k where C_out < C_in (XLA CPU's
    # matmul with a 3-row left operand is 3.5x faster than with a 3-column right one).
    out_first = go.shape[-1] < x.shape[-1]

    def one(example):
        x_i, g_i = example
        # Padded per example: a padded copy of the batch would raise the step's peak memory.
        x_i = lax.pad(x_i, jnp.zeros((), x_i.dtype), (*((lo, hi, 0) for lo, hi in padding), (0, 0, 0)))
        g_i = g_i.reshape(-1, g_i.shape[-1])
        rows = []
        for offset in np.ndindex(*window):
            x_k = lax.slice(x_i, (*offset, 0), (*(k + n for k, n in zip(offset, out_spatial)), x_i.shape[-1]))
            x_k = x_k.reshape(-1, x_i.shape[-1])
            rows.append(jnp.dot(g_i.T, x_k, precision=conv["precision"]).T if out_first
                        else jnp.dot(x_k.T, g_i, precision=conv["precision"]))
        return jnp.stack(rows).reshape(*window, *rows[0].shape)  # (*window, C_in, C_out)

    w = lax.map(one, (x, go))
    # (B, *window, I, O) -> (B, O, I, *window): rhs_spec order, then the kernel's layout.
    w = jnp.moveaxis(w, (-1, -2), (1, 2))
    return jnp.transpose(w, (0, *(1 + int(d) for d in np.argsort(rhs_spec))))


def _depthwise_fft(lhs, g, kernel_shape, conv) -> jax.Array:
    """Per-example depthwise 1-D kernel gradients, w[k, c] = sum_t g[t, c]
    x[t + k, c] over the padded input, by FFT (O(T log T), not O(T K)); in the
    kernel's layout."""
    lhs_spec, rhs_spec, out_spec = conv["dimension_numbers"]
    padding = conv["padding"]
    taps = kernel_shape[rhs_spec[2]]
    if isinstance(padding, str):
        padding = lax.padtype_to_pads((lhs.shape[1 + lhs_spec[2]],), (taps,), (1,), padding)
    x = _channels_first(lhs, lhs_spec)[:, 0]  # (B, C, T), padded below to T_in
    go = _channels_first(g, out_spec)[:, 0]  # (B, C, T_out)
    (left, right), = padding
    # A circular correlation of length n equals the linear one at the lags
    # k < taps once n >= T_in (= T_out + taps - 1 at unit strides): t + k never
    # wraps. (n >= T_in + T_out, as first written, doubled the spectra: on
    # StateSpace small 1.23x the non-private step's tensor memory, then 1.11x.)
    n = int(2 ** math.ceil(math.log2(left + x.shape[-1] + right)))
    x = jnp.pad(x, ((0, 0), (0, 0), (left, n - left - x.shape[-1])))
    go = jnp.pad(go, ((0, 0), (0, 0), (0, n - go.shape[-1])))
    # One FFT of both: the input's spectrum cannot then be formed in the
    # forward pass and held through the backward pass until the output
    # gradient comes (XLA's scheduler did that: StateSpace small 1.11x -> 0.99x).
    x_spectrum, go_spectrum = jnp.fft.rfft(jnp.stack([x, go]), axis=-1)
    spectrum = x_spectrum * jnp.conj(go_spectrum)
    w = jnp.fft.irfft(spectrum, n)[..., :taps].astype(g.dtype)  # (B, C, K)
    # Back to the kernel's layout: (O, I=1, K) in rhs_spec order.
    order = np.argsort(rhs_spec)
    return jnp.transpose(w[:, :, None, :], (0, *(1 + int(d) for d in order)))


class EmbedRule:
    """nnx.Embed (one call): ``segment``, the output gradients of equal tokens
    summed per example; the clipped sum by a scaled scatter-add."""

    def route(self, layer, info: LayerInfo, shapes: dict) -> str | None:
        return SEGMENT if info.calls == 1 and layer.num_embeddings > 1 else None

    def work(self, layer, info: LayerInfo, params, records, grads, route) -> Work:
        tokens, g = records[0]["args"][0], grads[0]
        batch = tokens.shape[0]
        tokens = tokens.reshape(batch, -1)
        length = tokens.shape[1]
        g = g.reshape(batch, length, -1)
        order = jnp.argsort(tokens, axis=1)
        sorted_tokens = jnp.take_along_axis(tokens, order, axis=1)
        sorted_g = jnp.take_along_axis(g, order[..., None], axis=1)
        starts = jnp.concatenate([jnp.ones((batch, 1), bool),
                                  sorted_tokens[:, 1:] != sorted_tokens[:, :-1]], axis=1)
        segments = jnp.cumsum(starts, axis=1) - 1 + length * jnp.arange(batch)[:, None]
        rows = jax.ops.segment_sum(sorted_g.reshape(batch * length, -1), segments.reshape(-1),
                                   num_segments=batch * length)
        work = Work(sq_norms(rows.reshape(batch, -1)))
        work.bookkeeping = lambda factors: {"embedding": jnp.zeros_like(params["embedding"]).at[
            tokens.reshape(-1)].add(_scale(g, factors).reshape(batch * length, -1))}
        return work


class NormLayerRule:
    """nnx.LayerNorm, nnx.GroupNorm (any number of calls): ``elementwise``,
    their per-example gradients (as small as the parameters) kept."""

    def route(self, layer, info: LayerInfo, shapes: dict) -> str | None:
        return ELEMENTWISE

    def work(self, layer, info: LayerInfo, params, records, grads, route) -> Work:
        return layer_vjp(layer, records, grads)


RULES: dict[type, LayerRule] = {nnx.Linear: LinearRule(), nnx.Conv: ConvRule(), nnx.Embed: EmbedRule(),
         nnx.LayerNorm: NormLayerRule(), nnx.GroupNorm: NormLayerRule()}
