"""Fast exact DP-SGD for JAX / Flax NNX: every example's gradient clipped,
without forming per-example gradients where that is the costly part.

The same algebra as :mod:`privbench.dp.fast_torch`, as one pure function that
``jax.jit`` compiles whole:

1. The per-example loss (``loss_fn`` on a batch of one, as jax-privacy's
   ``clipped_grad``) is vmapped over the batch, with every layer that owns
   parameters *tapped*: the tap records the layer's input and adds a zero
   "probe" array to its output. The cotangent of the probes, from one
   ``jax.vjp`` with respect to the probes only, is every layer's per-example
   output gradient; the parameters are not differentiated, so no per-example
   (or even batch) weight gradient is formed by the backward pass.
2. Per layer, the squared norms of the per-example parameter gradients, by
   the cheaper exact route for its shapes: ``ghost`` (Linear; Conv over
   patches) from two T x T Gram matrices; ``direct`` (Linear: batched matmul;
   Conv: the weight gradient with the batch in the feature groups); ``fft``
   (depthwise 1-D convolution with a long kernel: the cross-correlation of
   input and output gradient by FFT, O(T log T) instead of O(T K));
   ``segment`` (Embed: equal tokens' output gradients summed per example);
   ``stored`` (LayerNorm, GroupNorm: their small per-example gradients).
3. Clip factors from the summed norms, then each parameter's clipped sum by
   book-keeping: the layer's ordinary weight gradient with each example's
   output gradient scaled by its factor, or the weighted sum of per-example
   gradients where they were formed and are no larger than the layer input.

Layers without a rule (or a Linear with a custom dot_general, a masked Conv,
a layer called twice...) take exact general paths listed by
:meth:`FastClippedGrad.describe`: ``vjp`` (the layer's per-example parameter
gradients by vmap of its vjp) and ``whole_model`` (per-example gradients of
the remaining parameters by vmap of grad over the whole model).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from privbench.training import jax_steps

# The methods, as listed by FastClippedGrad.describe().
GHOST, DIRECT, FFT, SEGMENT, STORED = "ghost", "direct", "fft", "segment", "stored"
VJP_FALLBACK, WHOLE_MODEL_FALLBACK = "vjp", "whole_model"

# A depthwise 1-D kernel at least this long takes the FFT route.
FFT_MIN_KERNEL = 32

_CONV_SIGNATURE = inspect.signature(lax.conv_general_dilated)


# --------------------------------------------------------------------------- taps

@dataclass
class _LayerInfo:
    """What the trace learned about one tapped layer (static, no arrays)."""

    layer_type: type
    calls: int = 0
    array_args: bool = True
    conv: dict | None = None  # the lax.conv_general_dilated arguments, lhs and rhs aside


class _Taps:
    """Taps on the layers of one freshly merged model, inside the traced
    per-example loss. With ``probes`` None (the shape pass) a tap records its
    output instead of adding a probe to it."""

    def __init__(self, probes: dict | None):
        self.probes = probes
        self.records: dict[str, list] = {}
        self.outputs: dict[str, list] = {}
        self.info: dict[str, _LayerInfo] = {}

    def install(self, module: nnx.Module) -> None:
        for path, layer in list(nnx.iter_modules(module)):
            if path and _own_params(layer) and not list(nnx.iter_module_children(layer)):
                parent = module
                for key in path[:-1]:
                    parent = parent[key] if isinstance(key, int) else getattr(parent, key)
                tap = _Tap(layer, _key(path), self)
                if isinstance(path[-1], int):
                    parent[path[-1]] = tap
                else:
                    setattr(parent, path[-1], tap)


class _Tap:
    def __init__(self, layer, key: str, taps: _Taps):
        self.layer, self.key, self.taps = layer, key, taps

    def __call__(self, *args, **kwargs):
        info = self.taps.info.setdefault(self.key, _LayerInfo(type(self.layer)))
        record = {"args": args, "kwargs": kwargs}
        info.array_args &= all(isinstance(x, jax.Array) for x in jax.tree.leaves((args, kwargs)))
        if isinstance(self.layer, nnx.Conv):
            out = self._call_conv(record, info, args, kwargs)
        else:
            out = self.layer(*args, **kwargs)
        index = info.calls
        info.calls += 1
        self.taps.records.setdefault(self.key, []).append(record)
        if self.taps.probes is None:
            self.taps.outputs.setdefault(self.key, []).append(out)
            return out
        return jax.tree.map(jnp.add, out, self.taps.probes[self.key][index])

    def _call_conv(self, record, info, args, kwargs):
        """Run the Conv with its convolution primitive intercepted, to record
        the input exactly as the convolution sees it (after the layer's own
        padding and reshaping) and the convolution's arguments."""
        layer = self.layer
        convolve = layer.conv_general_dilated

        def intercept(lhs, rhs, *rest, **options):
            bound = _CONV_SIGNATURE.bind(lhs, rhs, *rest, **options)
            bound.apply_defaults()
            conv = dict(bound.arguments)
            record["lhs"] = conv.pop("lhs")
            conv.pop("rhs")
            conv.pop("out_sharding", None)
            info.conv = conv
            return convolve(lhs, rhs, *rest, **options)

        layer.conv_general_dilated = intercept
        try:
            return layer(*args, **kwargs)
        finally:
            layer.conv_general_dilated = convolve


def _layers(module) -> dict:
    """key -> (path, layer) of every submodule."""
    return {_key(path): (path, layer) for path, layer in nnx.iter_modules(module) if path}


def _own_params(layer) -> list[str]:
    return [name for name, value in vars(layer).items() if isinstance(value, nnx.Param)]


def _key(path) -> str:
    return ".".join(str(p) for p in path)


# --------------------------------------------------------------------------- per-layer rules

@dataclass
class _Work:
    sq_norms: jax.Array
    per_example: dict = field(default_factory=dict)  # param name -> (B, *shape), kept
    bookkeeping: Callable | None = None  # factors -> {param name: clipped sum}


def _keep(per_example_size: int, input_size: int) -> bool:
    """Keep per-example gradients for the sum when they take no more memory
    than the layer input that is held anyway; else book-keeping recomputes."""
    return per_example_size <= input_size


def _sq(x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(x).reshape(x.shape[0], -1), axis=1)


def _scale(g: jax.Array, factors: jax.Array) -> jax.Array:
    return g * factors.reshape((-1,) + (1,) * (g.ndim - 1))


def _ghost_sq_norms(a: jax.Array, g: jax.Array) -> jax.Array:
    """<A A^T, G G^T> per example for a (B, ..., T, d), g (B, ..., T, p)."""
    grams = jnp.einsum("...td,...sd->...ts", a, a) * jnp.einsum("...tp,...sp->...ts", g, g)
    return jnp.sum(grams.reshape(grams.shape[0], -1), axis=1)


def _linear_method(layer, record_shapes) -> str:
    d, p = layer.in_features, layer.out_features
    rows = math.prod(record_shapes["x"][1:]) // d
    if rows * rows * (d + p) < rows * d * p:
        return GHOST
    return STORED if _keep(d * p, rows * d) else DIRECT


def _linear(layer, params, record, g, method) -> _Work:
    x = record["args"][0]
    batch = x.shape[0]
    a = x.reshape(batch, -1, layer.in_features)
    g = g.reshape(batch, -1, layer.out_features)
    work = _Work(jnp.zeros(batch, g.dtype))
    if method == GHOST:
        work.sq_norms += _ghost_sq_norms(a, g)
    else:
        per_example = jnp.einsum("btd,btp->bdp", a, g)
        work.sq_norms += _sq(per_example)
        if method == STORED:
            work.per_example["kernel"] = per_example
    if "bias" in params:
        work.per_example["bias"] = g.sum(axis=1)
        work.sq_norms += _sq(work.per_example["bias"])
    if "kernel" not in work.per_example:
        work.bookkeeping = lambda factors: {
            "kernel": jnp.einsum("btd,btp->dp", a, _scale(g, factors))}
    return work


def _conv_method(layer, info, record_shapes) -> str:
    conv = info.conv
    lhs_spec, rhs_spec, out_spec = conv["dimension_numbers"]
    kernel_shape = layer.kernel.shape
    kernel = math.prod(kernel_shape[d] for d in rhs_spec[2:])
    c_in, c_out = layer.in_features, layer.out_features
    groups = conv["feature_group_count"]
    out_shape = record_shapes["out"][1:]  # per example, batch of one
    positions = math.prod(out_shape[d] for d in out_spec[2:])
    weight_size = c_out * (c_in // groups) * kernel
    if _fft_applies(layer, conv) and kernel >= FFT_MIN_KERNEL:
        return FFT
    if positions * positions * (c_in * kernel + c_out) < positions * weight_size:
        return GHOST
    return STORED if _keep(weight_size, math.prod(record_shapes["lhs"][1:])) else DIRECT


def _fft_applies(layer, conv) -> bool:
    """Depthwise, one spatial dimension, unit strides and dilations."""
    return (len(conv["dimension_numbers"][0]) == 3 and conv["feature_group_count"] == layer.in_features
            == layer.out_features and conv["batch_group_count"] == 1
            and all(v in (None, 1) or tuple(v) == (1,) for v in (
                conv["window_strides"], conv["lhs_dilation"], conv["rhs_dilation"])))


def _conv(layer, params, record, g, method, conv) -> _Work:
    lhs = record["lhs"]  # (B, *per-example lhs with its batch of one)
    kernel = params["kernel"]
    batch = lhs.shape[0]

    def convolve(lhs_i, k):
        return lax.conv_general_dilated(lhs_i, k, **conv)

    work = _Work(jnp.zeros(batch, g.dtype))
    if method == GHOST:
        work.sq_norms += _conv_ghost_sq_norms(lhs, g, kernel.shape, conv)
    else:
        if method == FFT:
            per_example = _depthwise_fft(lhs, g, kernel.shape, conv)
        else:
            per_example = jax.vmap(
                lambda lhs_i, g_i: jax.vjp(lambda k: convolve(lhs_i, k), kernel)[1](g_i)[0])(lhs, g)
        work.sq_norms += _sq(per_example)
        if method in (STORED, FFT):
            work.per_example["kernel"] = per_example
    if "bias" in params:
        out_spec = conv["dimension_numbers"][2]
        feature_last = jnp.moveaxis(g, 1 + out_spec[1], -1)
        work.per_example["bias"] = feature_last.reshape(batch, -1, feature_last.shape[-1]).sum(axis=1)
        work.sq_norms += _sq(work.per_example["bias"])
    if "kernel" not in work.per_example:
        def bookkeeping(factors):
            batched = jax.vmap(convolve, in_axes=(0, None))
            return {"kernel": jax.vjp(lambda k: batched(lhs, k), kernel)[1](_scale(g, factors))[0]}

        work.bookkeeping = bookkeeping
    return work


def _channels_first(x: jax.Array, spec) -> jax.Array:
    """(B, *per-example array in layout ``spec``) -> (B, N, C, *spatial)."""
    return jnp.transpose(x, (0, *(1 + d for d in spec)))


def _conv_ghost_sq_norms(lhs, g, kernel_shape, conv) -> jax.Array:
    """Ghost norm over the convolution's patches, one row per output position
    and each feature group its own linear map."""
    lhs_spec, rhs_spec, out_spec = conv["dimension_numbers"]
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
    return _ghost_sq_norms(jnp.swapaxes(a, 2, 3), jnp.swapaxes(go, 2, 3))


def _depthwise_fft(lhs, g, kernel_shape, conv) -> jax.Array:
    """Per-example depthwise 1-D kernel gradients, w[k, c] = sum_t g[t, c]
    x[t + k, c] over the padded input, by FFT; in the kernel's layout."""
    lhs_spec, rhs_spec, out_spec = conv["dimension_numbers"]
    padding = conv["padding"]
    if isinstance(padding, str):
        length = lhs.shape[1 + lhs_spec[2]]
        padding = lax.padtype_to_pads((length,), (kernel_shape[rhs_spec[2]],), (1,), padding)
    x = _channels_first(lhs, lhs_spec)[:, 0]  # (B, C, T_in)
    x = jnp.pad(x, ((0, 0), (0, 0), tuple(padding[0])))
    go = _channels_first(g, out_spec)[:, 0]  # (B, C, T_out)
    taps = kernel_shape[rhs_spec[2]]
    n = int(2 ** math.ceil(math.log2(x.shape[-1] + go.shape[-1])))
    spectrum = jnp.fft.rfft(x, n) * jnp.conj(jnp.fft.rfft(go, n))
    w = jnp.fft.irfft(spectrum, n)[..., :taps].astype(g.dtype)  # (B, C, K)
    # Back to the kernel's layout: (O, I=1, K) in rhs_spec order.
    oik = w[:, :, None, :]
    order = np.argsort(rhs_spec)
    return jnp.transpose(oik, (0, *(1 + int(d) for d in order)))


def _embed(layer, params, record, g, method) -> _Work:
    tokens = record["args"][0]
    batch = tokens.shape[0]
    tokens = tokens.reshape(batch, -1)
    g = g.reshape(batch, tokens.shape[1], -1)
    length = tokens.shape[1]
    order = jnp.argsort(tokens, axis=1)
    sorted_tokens = jnp.take_along_axis(tokens, order, axis=1)
    sorted_g = jnp.take_along_axis(g, order[..., None], axis=1)
    starts = jnp.concatenate([jnp.ones((batch, 1), bool),
                              sorted_tokens[:, 1:] != sorted_tokens[:, :-1]], axis=1)
    segments = jnp.cumsum(starts, axis=1) - 1 + length * jnp.arange(batch)[:, None]
    rows = jax.ops.segment_sum(sorted_g.reshape(batch * length, -1), segments.reshape(-1),
                               num_segments=batch * length)
    work = _Work(jnp.sum(jnp.square(rows).reshape(batch, -1), axis=1))
    work.bookkeeping = lambda factors: {"embedding": jnp.zeros_like(params["embedding"]).at[
        tokens.reshape(-1)].add(_scale(g, factors).reshape(batch * length, -1))}
    return work


def _layer_vjp(layer, record_list, grads) -> _Work:
    """Per-example gradients of a leaf layer's parameters, summed over its
    calls: the vjp of the layer on each example's recorded arguments."""
    layer_def, layer_params, layer_rest = nnx.split(layer, nnx.Param, ...)
    total = None
    for record, g in zip(record_list, grads):
        def one(args, kwargs, g_i):
            def apply(p):
                return nnx.merge(layer_def, p, layer_rest)(*args, **kwargs)

            return jax.vjp(apply, layer_params)[1](g_i)[0]

        per_example = jax.vmap(one)(record["args"], record["kwargs"], g)
        total = per_example if total is None else jax.tree.map(jnp.add, total, per_example)
    flat = {path[0]: value for path, value in nnx.to_flat_state(total)}
    per_example = {name: value[...] if isinstance(value, nnx.Variable) else value
                   for name, value in flat.items()}
    return _Work(sum(_sq(v) for v in per_example.values()), per_example=per_example)


_RULES = {nnx.Linear: _linear, nnx.Embed: _embed}
_STORED_TYPES = (nnx.LayerNorm, nnx.GroupNorm)


# --------------------------------------------------------------------------- the clipped gradient

@dataclass
class _Plan:
    probe_shapes: dict  # key -> list of output shapes (ShapeDtypeStruct trees), one per call
    methods: dict  # key -> method
    info: dict  # key -> _LayerInfo
    record_shapes: dict  # key -> {"x" | "lhs" | "out": shape}
    layer_types: dict  # key -> type name
    whole_model: list  # parameter paths for the whole-model fallback


class FastClippedGrad:
    """``(params, rest, inputs, targets) -> clipped gradient sum / normalize_by``
    for a Flax NNX model split as ``nnx.split(model, nnx.Param, ...)`` (the
    signature of ``jax_privacy.clipped_grad``'s function in the kit)."""

    def __init__(self, graphdef, loss_fn: Callable, l2_clip_norm: float, normalize_by: float = 1.0):
        if not l2_clip_norm > 0:
            raise ValueError(f"l2_clip_norm={l2_clip_norm!r} must be > 0")
        self.graphdef = graphdef
        self.loss_fn = loss_fn
        self.l2_clip_norm = float(l2_clip_norm)
        self.normalize_by = float(normalize_by)

    def _example_loss(self, params, rest, probes, inputs, target, taps: _Taps | None):
        """The loss of one example, as a batch of one, with the layers tapped."""
        module = nnx.merge(self.graphdef, params, rest)
        if taps is not None:
            taps.install(module)
        batch_of_one = tuple(x[None] for x in inputs)
        return self.loss_fn(module(*batch_of_one), target[None])

    def _plan(self, params, rest, inputs, targets) -> _Plan:
        """Trace once for shapes (no computation): which layers ran, how often,
        on what shapes, and the route each takes."""
        taps = _Taps(None)

        def shapes(params, rest, inputs, targets):
            def one(x, y):
                loss = self._example_loss(params, rest, None, x, y, taps)
                firsts = {key: {name: value for name, value in (
                    ("x", calls[0]["args"][0] if calls[0]["args"] else None),
                    ("lhs", calls[0].get("lhs"))) if isinstance(value, jax.Array)}
                    for key, calls in taps.records.items()}
                return loss, taps.outputs, firsts

            return jax.vmap(one)(inputs, targets)

        _, outputs, firsts = jax.eval_shape(shapes, params, rest, tuple(inputs), targets)
        layers = _layers(nnx.merge(self.graphdef, params, rest))
        methods, record_shapes = {}, {}
        for key, info in taps.info.items():
            record_shapes[key] = {name: value.shape for name, value in firsts[key].items()}
            record_shapes[key]["out"] = jax.tree.leaves(outputs[key][0])[0].shape
            methods[key] = self._method(layers[key][1], info, record_shapes[key])
        covered = {layers[key][0] for key, method in methods.items()
                   if method != WHOLE_MODEL_FALLBACK}
        whole_model = [path for path, _ in nnx.to_flat_state(params) if path[:-1] not in covered]
        return _Plan(outputs, methods, dict(taps.info), record_shapes,
                     {key: type(layers[key][1]).__name__ for key in taps.info}, whole_model)

    @staticmethod
    def _method(layer, info: _LayerInfo, record_shapes) -> str:
        if not info.array_args:
            return WHOLE_MODEL_FALLBACK
        if info.calls == 1 and type(layer) is nnx.Linear and layer.dot_general is lax.dot_general \
                and "x" in record_shapes:
            return _linear_method(layer, record_shapes)
        if info.calls == 1 and type(layer) is nnx.Conv and layer.mask is None and info.conv:
            return _conv_method(layer, info, record_shapes)
        if info.calls == 1 and type(layer) is nnx.Embed and layer.num_embeddings > 1:
            return SEGMENT
        if type(layer) in _STORED_TYPES:
            return STORED
        return VJP_FALLBACK

    def describe(self, params, rest, inputs, targets) -> dict:
        """The route of every tapped layer for these shapes (traces, runs nothing)."""
        plan = self._plan(params, rest, inputs, targets)
        layers = [f"{key} ({plan.layer_types[key]}): {method}" for key, method in plan.methods.items()]
        counts: dict[str, int] = {}
        for method in plan.methods.values():
            counts[method] = counts.get(method, 0) + 1
        fallback = [line for line, method in zip(layers, plan.methods.values())
                    if method in (VJP_FALLBACK, WHOLE_MODEL_FALLBACK)]
        fallback += [f"{_key(path)}: {WHOLE_MODEL_FALLBACK}" for path in plan.whole_model]
        return {"dp_layers": layers,
                "dp_methods": ", ".join(f"{m} {n}" for m, n in sorted(counts.items())),
                "dp_fallback": fallback}

    def __call__(self, params, rest, inputs, targets):
        inputs = tuple(inputs)
        plan = self._plan(params, rest, inputs, targets)
        probes = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), plan.probe_shapes)
        tapped = {key for key, method in plan.methods.items() if method != WHOLE_MODEL_FALLBACK}

        def batch_loss(probes):
            def one(probes_i, x, y):
                taps = _Taps(probes_i)
                loss = self._example_loss(params, rest, probes_i, x, y, taps)
                return loss, {k: v for k, v in taps.records.items() if k in tapped}

            losses, records = jax.vmap(one)(probes, inputs, targets)
            return jnp.sum(losses), records

        _, pullback, records = jax.vjp(batch_loss, probes, has_aux=True)
        (out_grads,) = pullback(jnp.ones((), dtype=jnp.result_type(float)))

        layers = _layers(nnx.merge(self.graphdef, params, rest))
        flat_params = {path: var[...] for path, var in nnx.to_flat_state(params)}
        batch = targets.shape[0]
        sq_norms = jnp.zeros(batch, jnp.float32)
        works = {}
        for key in tapped:
            (layer_path, layer), method = layers[key], plan.methods[key]
            own = {path[-1]: value for path, value in flat_params.items()
                   if path[:-1] == layer_path}
            if method == VJP_FALLBACK or method == STORED:
                work = _layer_vjp(layer, records[key], out_grads[key])
            elif type(layer) is nnx.Conv:
                work = _conv(layer, own, records[key][0], out_grads[key][0], method,
                             plan.info[key].conv)
            else:
                work = _RULES[type(layer)](layer, own, records[key][0], out_grads[key][0], method)
            sq_norms += work.sq_norms
            works[key] = work
        whole_model = {}
        if plan.whole_model:
            whole_model = self._whole_model_per_example(params, rest, inputs, targets, plan.whole_model)
            sq_norms += sum(_sq(v) for v in whole_model.values())

        factors = self.l2_clip_norm / jnp.maximum(jnp.sqrt(sq_norms), self.l2_clip_norm)
        sums = {}
        for key, work in works.items():
            prefix = layers[key][0]
            for name, per_example in work.per_example.items():
                sums[prefix + (name,)] = jnp.tensordot(factors, per_example, axes=1)
            if work.bookkeeping is not None:
                for name, value in work.bookkeeping(factors).items():
                    sums[prefix + (name,)] = value
        for path, per_example in whole_model.items():
            sums[path] = jnp.tensordot(factors, per_example, axes=1)
        return nnx.from_flat_state([
            (path, var.replace(sums.get(path, jnp.zeros_like(var[...])) / self.normalize_by))
            for path, var in nnx.to_flat_state(params)])

    def _whole_model_per_example(self, params, rest, inputs, targets, paths) -> dict:
        """Per-example gradients of the parameters at ``paths``, by vmap of grad
        over the whole model (each example a batch of one)."""
        chosen = set(paths)
        flat = list(nnx.to_flat_state(params))
        fixed = nnx.from_flat_state([(p, v) for p, v in flat if p not in chosen])
        free = nnx.from_flat_state([(p, v) for p, v in flat if p in chosen])

        def example_loss(free, x, y):
            module = nnx.merge(self.graphdef, fixed, free, rest)
            return self.loss_fn(module(*(a[None] for a in x)), y[None])

        grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(free, inputs, targets)
        return {path: value[...] if isinstance(value, nnx.Variable) else value
                for path, value in nnx.to_flat_state(grads)}


def clipped_grad_sum_fast_jax(model_module, loss_fn, inputs, targets, l2_clip_norm):
    """Sum over the batch of per-example gradients clipped to ``l2_clip_norm``,
    before noise, as an nnx.State shaped like the model's parameters (the fast
    counterpart of ``privbench.training.jax_steps.clipped_grad_sum_jax``)."""
    graphdef, params, rest = nnx.split(model_module, nnx.Param, ...)
    grad_fn = FastClippedGrad(graphdef, loss_fn, l2_clip_norm)
    return jax.jit(grad_fn)(params, rest, tuple(inputs), targets)


# --------------------------------------------------------------------------- the kit's trainer

class FastDPTrainer(jax_steps.ClippedTrainer):
    """Training mode ``fast_dp`` (jax): the clipped mode's update (clipped sum
    / B, Gaussian noise of std noise_std, AdamW) with the clipped sum from
    :class:`FastClippedGrad`."""

    mode = "fast_dp"
    grad_sample_mode = None

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.description.update(self._grad.describe(self._params, self._rest, *self._batch))

    def _grad_fn(self, graphdef, loss_fn, batch_size, microbatch_size, settings):
        self._grad = FastClippedGrad(graphdef, loss_fn, settings["l2_clip_norm"], batch_size)
        return self._grad
