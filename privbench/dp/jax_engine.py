"""Exact DP-SGD for JAX / Flax NNX: every example's gradient clipped, without
forming per-example gradients where that is the costly part.

The same algebra as the PyTorch engine, as one pure function that ``jax.jit``
compiles whole:

1. The per-example loss (``loss_fn`` on a batch of one, as jax-privacy's
   ``clipped_grad``) is vmapped over the batch, with every leaf layer that owns
   parameters *tapped*: the tap records the layer's input and adds a zero
   "probe" array to its output. The cotangent of the probes, from one
   ``jax.vjp`` with respect to the probes only, is every layer's per-example
   output gradient; the parameters are not differentiated, so no per-example
   (or even batch) weight gradient is formed by the backward pass. Where every
   tapped array of the model run on the whole batch is the examples' arrays
   stacked (checked on shapes, at trace time) and the model max-pools, it
   runs once on the batch, as the non-private step does, and only the loss
   is vmapped (``dp_forward: whole_batch``): XLA forms the per-example vmap
   of a max-pool's backward pass as a scatter, larger in memory.
2. Per layer, the squared norms of the per-example parameter gradients by the
   route its rule (:mod:`privbench.dp.jax_rules`) takes for its shapes, chosen
   by the shared cost model :mod:`privbench.dp.cost`: ``gram`` (Linear, Conv
   over patches: two T x T Gram matrices), ``direct`` / ``kept`` (the
   per-example gradient, kept for the sum where it fits), ``fft`` (depthwise
   1-D convolution with a long kernel), ``segment`` (Embed), ``elementwise``
   (LayerNorm, GroupNorm).
3. Clip factors from the summed norms, then each parameter's clipped sum:
   the weighted sum of the kept per-example gradients, or by book-keeping (the
   layer's ordinary weight gradient with each example's output gradient scaled
   by its factor).

Layers without a rule (or a Linear with a custom dot_general, a masked Conv,
a layer called twice...) take exact general paths listed by
:meth:`ClippedGradEngine.describe`: ``vjp`` (the layer's per-example parameter
gradients by vmap of its vjp) and ``whole_model`` (per-example gradients of
the remaining parameters, e.g. owned by a non-leaf module, by vmap of grad
over the whole model).

Public API: :class:`ClippedGradEngine`, :func:`clipped_grad_sum`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from privbench.dp.jax_rules import (RULES, VJP_FALLBACK, WHOLE_MODEL_FALLBACK, LayerInfo,
                                    layer_vjp, sq_norms)

_CONV_SIGNATURE = inspect.signature(lax.conv_general_dilated)
# Pooling primitives whose backward pass, vmapped per example, XLA forms as a scatter.
_WINDOWED_EXTREMA = {"reduce_window_max", "reduce_window_min"}


def _primitives(jaxpr) -> set[str]:
    """The names of the primitives of ``jaxpr`` and of the jaxprs inside it."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for value in eqn.params.values():
            for inner in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(inner, "jaxpr", inner)  # a ClosedJaxpr holds its Jaxpr
                if hasattr(inner, "eqns"):
                    names |= _primitives(inner)
    return names


# --------------------------------------------------------------------------- taps

class _Taps:
    """Taps on the layers of one freshly merged model, inside the traced
    per-example loss. With ``probes`` None (the shape pass) a tap records its
    output instead of adding a probe to it."""

    def __init__(self, probes: dict | None):
        self.probes = probes
        self.records: dict[str, list] = {}
        self.outputs: dict[str, list] = {}
        self.info: dict[str, LayerInfo] = {}

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
        info = self.taps.info.setdefault(self.key, LayerInfo(type(self.layer)))
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


def _route(layer, info: LayerInfo, shapes: dict) -> str:
    """The route label of one tapped layer: its rule's, else a fallback."""
    if not info.array_args:
        return WHOLE_MODEL_FALLBACK
    rule = RULES.get(type(layer))
    route = rule.route(layer, info, shapes) if rule else None
    return route or VJP_FALLBACK


# --------------------------------------------------------------------------- the clipped gradient

@dataclass
class _Plan:
    probe_shapes: dict  # key -> list of output shapes (ShapeDtypeStruct trees), one per call
    routes: dict  # key -> route label
    info: dict  # key -> LayerInfo
    layer_types: dict  # key -> type name
    whole_model: list  # parameter paths for the whole-model fallback
    whole_batch: bool = False  # the model may run on the whole batch at once (see _batch_loss)


class ClippedGradEngine:
    """The clipped gradient sum of a Flax NNX model, split as
    ``graphdef, params, rest = nnx.split(model, nnx.Param, ...)``.

    ``engine(params, rest, inputs, targets)`` returns an nnx.State shaped like
    ``params``: sum over the batch of every example's gradient clipped to
    ``l2_clip_norm``, divided by ``normalize_by`` (the signature of
    ``jax_privacy.clipped_grad``'s function: a pure function, to ``jax.jit``).
    ``inputs`` is a tuple of arrays and ``targets`` an array, batch first;
    ``loss_fn(outputs, targets)`` is the mean loss, called per example on a
    batch of one.
    """

    def __init__(self, graphdef, loss_fn: Callable, l2_clip_norm: float, normalize_by: float = 1.0):
        if not l2_clip_norm > 0:
            raise ValueError(f"l2_clip_norm={l2_clip_norm!r} must be > 0")
        self.graphdef = graphdef
        self.loss_fn = loss_fn
        self.l2_clip_norm = float(l2_clip_norm)
        self.normalize_by = float(normalize_by)

    def _example_loss(self, params, rest, inputs, target, taps: _Taps):
        """The loss of one example, as a batch of one, with the layers tapped."""
        module = nnx.merge(self.graphdef, params, rest)
        taps.install(module)
        return self.loss_fn(module(*(x[None] for x in inputs)), target[None])

    def _batch_outputs(self, params, rest, inputs, taps: _Taps):
        """The model's outputs on the whole batch at once, with the layers tapped."""
        module = nnx.merge(self.graphdef, params, rest)
        taps.install(module)
        return module(*inputs)

    def _batch_loss(self, params, rest, inputs, targets, probes, tapped):
        """The summed per-example losses and the tapped layers' records, the
        model run once on the whole batch (as the non-private step runs it: no
        per-example vmap of its backward pass, whose pooling gradients XLA
        turns into scatters) and only the loss vmapped over the examples.
        Probes and records keep the per-example shapes (B, 1, ...)."""
        taps = _Taps(jax.tree.map(lambda p: p.reshape(p.shape[0], *p.shape[2:]), probes))
        outputs = self._batch_outputs(params, rest, inputs, taps)
        losses = jax.vmap(lambda out, y: self.loss_fn(jax.tree.map(lambda a: a[None], out), y[None]))(
            outputs, targets)
        records = {key: jax.tree.map(lambda a: a[:, None], taps.records[key]) for key in tapped}
        return jnp.sum(losses), records

    def _plan(self, params, rest, inputs, targets) -> _Plan:
        """Trace once for shapes (no computation): which layers ran, how often,
        on what shapes, and the route each takes."""
        taps = _Taps(None)

        def shapes(params, rest, inputs, targets):
            def one(x, y):
                loss = self._example_loss(params, rest, x, y, taps)
                arrays = {key: calls for key, calls in taps.records.items() if taps.info[key].array_args}
                return loss, taps.outputs, arrays

            return jax.vmap(one)(inputs, targets)

        _, outputs, records = jax.eval_shape(shapes, params, rest, tuple(inputs), targets)
        layers = _layers(nnx.merge(self.graphdef, params, rest))
        routes = {}
        for key, info in taps.info.items():
            first = records.get(key, [{}])[0]
            layer_shapes = {name: value.shape for name, value in (
                ("x", first["args"][0] if first.get("args") else None), ("lhs", first.get("lhs")))
                if isinstance(value, jax.ShapeDtypeStruct)}
            layer_shapes["out"] = jax.tree.leaves(outputs[key][0])[0].shape
            routes[key] = _route(layers[key][1], info, layer_shapes)
        covered = {layers[key][0] for key, route in routes.items() if route != WHOLE_MODEL_FALLBACK}
        whole_model = [path for path, _ in nnx.to_flat_state(params) if path[:-1] not in covered]
        plan = _Plan(outputs, routes, dict(taps.info),
                     {key: type(layers[key][1]).__name__ for key in taps.info}, whole_model)
        tapped = {key for key, route in routes.items() if route != WHOLE_MODEL_FALLBACK}
        plan.whole_batch = not whole_model and self._runs_on_whole_batch(
            params, rest, inputs, targets, ({k: outputs[k] for k in tapped}, {k: records[k] for k in tapped}))
        return plan

    def _runs_on_whole_batch(self, params, rest, inputs, targets, per_example) -> bool:
        """Whether the model is to run on the whole batch at once (``dp_forward:
        whole_batch``): where it max-pools (the per-example vmap of a windowed
        max's backward pass is a scatter: on the CNN, 1.19x the non-private
        step's tensor memory per example, 1.05x on the whole batch; on the
        models without pooling the whole batch took more, Diffusion 1.16x
        against 1.10x) and the model run on the batch records, at every tapped
        layer, exactly the per-example arrays stacked (each (B, *rest) where an
        example as a batch of one has (1, *rest)). Not so for arrays that do
        not carry the batch (e.g. position indices), or a model that mixes
        examples in a way that changes shapes; one that mixes them without
        changing shapes (BatchNorm) breaks the engine's assumption either way."""
        taps = _Taps(None)

        def batch(params, rest, inputs, targets):
            self._batch_outputs(params, rest, inputs, taps)
            return ({key: taps.outputs.get(key) for key in per_example[0]},
                    {key: taps.records.get(key) for key in per_example[1]})

        try:
            jaxpr, whole = jax.make_jaxpr(batch, return_shape=True)(params, rest, tuple(inputs), targets)
        except Exception:  # noqa: BLE001 (a model that cannot take the batch at once: vmap it)
            return False
        if not _primitives(jaxpr.jaxpr) & _WINDOWED_EXTREMA:
            return False
        flat_whole, tree_whole = jax.tree.flatten(whole)
        flat_each, tree_each = jax.tree.flatten(per_example)
        if tree_whole != tree_each:
            return False
        batch_size = targets.shape[0]
        return all(e.shape[:2] == (batch_size, 1) and w.shape == (batch_size, *e.shape[2:]) and w.dtype == e.dtype
                   for w, e in zip(flat_whole, flat_each))

    def describe(self, params, rest, inputs, targets) -> dict:
        """The route of every tapped layer for these shapes (traces, runs
        nothing), as run records list them: ``dp_layers`` ("<path> (<Type>):
        <route>"), ``dp_methods`` (count per route), ``dp_fallback`` (the
        layers and parameters on the ``vjp`` / ``whole_model`` paths) and
        ``dp_forward``: ``whole_batch`` (the model runs once on the batch, the
        loss per example) or ``per_example`` (vmap of the model over the examples)."""
        plan = self._plan(params, rest, inputs, targets)
        layers = [f"{key} ({plan.layer_types[key]}): {route}" for key, route in plan.routes.items()]
        counts: dict[str, int] = {}
        for route in plan.routes.values():
            counts[route] = counts.get(route, 0) + 1
        fallback = [line for line, route in zip(layers, plan.routes.values())
                    if route in (VJP_FALLBACK, WHOLE_MODEL_FALLBACK)]
        fallback += [f"{_key(path)}: {WHOLE_MODEL_FALLBACK}" for path in plan.whole_model]
        return {"dp_layers": layers,
                "dp_methods": ", ".join(f"{m} {n}" for m, n in sorted(counts.items())),
                "dp_fallback": fallback,
                "dp_forward": "whole_batch" if plan.whole_batch else "per_example"}

    def __call__(self, params, rest, inputs, targets):
        inputs = tuple(inputs)
        plan = self._plan(params, rest, inputs, targets)
        probes = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), plan.probe_shapes)
        tapped = {key: route for key, route in plan.routes.items() if route != WHOLE_MODEL_FALLBACK}

        def batch_loss(probes):
            if plan.whole_batch:
                return self._batch_loss(params, rest, inputs, targets, probes, tapped)

            def one(probes_i, x, y):
                taps = _Taps(probes_i)
                loss = self._example_loss(params, rest, x, y, taps)
                return loss, {k: v for k, v in taps.records.items() if k in tapped}

            losses, records = jax.vmap(one)(probes, inputs, targets)
            return jnp.sum(losses), records

        _, pullback, records = jax.vjp(batch_loss, probes, has_aux=True)
        (out_grads,) = pullback(jnp.ones((), dtype=jnp.result_type(float)))

        layers = _layers(nnx.merge(self.graphdef, params, rest))
        flat_params = {path: var[...] for path, var in nnx.to_flat_state(params)}
        total = jnp.zeros(targets.shape[0], jnp.float32)
        works = {}
        for key, route in tapped.items():
            layer_path, layer = layers[key]
            if route == VJP_FALLBACK:
                work = layer_vjp(layer, records[key], out_grads[key])
            else:
                own = {path[-1]: value for path, value in flat_params.items()
                       if path[:-1] == layer_path}
                work = RULES[type(layer)].work(layer, plan.info[key], own, records[key],
                                               out_grads[key], route)
            total += work.sq_norms
            works[layer_path] = work
        whole_model = {}
        if plan.whole_model:
            whole_model = self._whole_model_per_example(params, rest, inputs, targets, plan.whole_model)
            total += sum(sq_norms(v) for v in whole_model.values())

        factors = self.l2_clip_norm / jnp.maximum(jnp.sqrt(total), self.l2_clip_norm)
        sums = {path: jnp.tensordot(factors, g, axes=1) for path, g in whole_model.items()}
        for layer_path, work in works.items():
            sums.update({layer_path + (name,): value
                         for name, value in work.clipped_sums(factors).items()})
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


def clipped_grad_sum(model, loss_fn: Callable, inputs, targets, l2_clip_norm: float):
    """Sum over the batch of per-example gradients of ``model`` (an nnx.Module)
    clipped to ``l2_clip_norm``, before noise, as an nnx.State shaped like the
    model's parameters (jitted; the counterpart of
    ``privbench.training.jax_steps.clipped_grad_sum_jax``)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    engine = ClippedGradEngine(graphdef, loss_fn, l2_clip_norm)
    return jax.jit(engine)(params, rest, tuple(inputs), targets)
