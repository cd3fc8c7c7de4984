"""Where per-example clipping puts the batch, read from the traced program.

:func:`capture` traces (``jax.make_jaxpr``: no compilation, no execution) the
gradient functions the JAX trainers use, for one CNN size and batch:

    standard            jax.grad of the mean loss
    clipped             jax_privacy.clipped_grad over the whole batch
    clipped_microbatch  the same with a microbatch size

and extracts from each program the convolutions that compute a weight
gradient. A weight gradient has the kernel's spatial and input-channel
dimensions, so it is recognised by its output shape ``(kh, kw, c_in, n)``; a
standard program gives ``n = c_out``, a vmapped one ``n = k * c_out`` with the
``k`` per-example gradients folded into the output channels.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.extend.core import jaxprs_in_params

from privbench import models
from privbench.training import dp_methods, jax_steps

MODEL = "cnn"
CONV = "conv_general_dilated"
LOOPS = ("while", "scan")


def capture(size: str, batch_size: int, microbatch_size: int | None, l2_clip_norm: float,
            seed: int = 0) -> dict:
    """The weight-gradient convolutions of each program, and the programs' text."""
    family = models.family(MODEL)
    module = models.build("jax", MODEL, size, seed)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    inputs, targets = family.synthetic_batch(size, batch_size, "jax", seed)
    kernels = conv_kernels(params)

    # The functions the trainers differentiate with (jax_steps), normalised by B as in training.
    functions = {
        "standard": jax.grad(jax_steps.pure_loss(graphdef, family.loss_jax)),
        "clipped": dp_methods.jax_privacy_grad(graphdef, family.loss_jax, l2_clip_norm, batch_size, None),
    }
    if microbatch_size is not None:
        functions["clipped_microbatch"] = dp_methods.jax_privacy_grad(
            graphdef, family.loss_jax, l2_clip_norm, batch_size, microbatch_size)

    programs = {}
    for name, function in functions.items():
        closed = jax.make_jaxpr(function)(params, rest, tuple(inputs), targets)
        programs[name] = {
            "equation_count": sum(1 for _ in _equations(closed.jaxpr)),
            "weight_gradient_convs": weight_gradient_convs(closed.jaxpr, kernels),
            "text": str(closed),
        }
    return {
        "size": size, "batch_size": batch_size, "microbatch_size": microbatch_size,
        "param_count": models.count_params("jax", module), "kernels": kernels, "programs": programs,
    }


def conv_kernels(params) -> list[dict]:
    """The model's convolution kernels (rank-4 parameters), in layer order."""
    return [{"layer": ".".join(map(str, path)), "shape": [int(d) for d in variable.shape]}
            for path, variable in nnx.to_flat_state(params) if len(variable.shape) == 4]


def _equations(jaxpr, loops: tuple[str, ...] = ()):
    """Every equation of a program, nested ones included, with the loops around it."""
    for eqn in jaxpr.eqns:
        yield eqn, loops
        inner = loops + ((eqn.primitive.name,) if eqn.primitive.name in LOOPS else ())
        for sub in jaxprs_in_params(eqn.params):
            yield from _equations(sub, inner)


def weight_gradient_convs(jaxpr, kernels: list[dict]) -> list[dict]:
    """The convolutions whose output is a weight gradient of one of ``kernels``."""
    by_prefix = {tuple(k["shape"][:3]): k for k in kernels}  # (kh, kw, c_in) identifies a layer
    order = [k["layer"] for k in kernels]
    found = []
    for eqn, loops in _equations(jaxpr):
        if eqn.primitive.name != CONV:
            continue
        out = eqn.outvars[0].aval
        kernel = by_prefix.get(tuple(out.shape[:3]))
        if kernel is None or len(out.shape) != 4 or out.shape[3] % kernel["shape"][3]:
            continue  # a forward or input-gradient convolution
        found.append({
            "layer": kernel["layer"],
            "kernel_shape": kernel["shape"],
            "shape": [int(d) for d in out.shape],
            "shape_text": out.str_short(short_dtypes=True),
            "weight_gradients": out.shape[3] // kernel["shape"][3],
            "feature_group_count": int(eqn.params["feature_group_count"]),
            "batch_group_count": int(eqn.params["batch_group_count"]),
            "operands": [v.aval.str_short(short_dtypes=True) for v in eqn.invars],
            "operand_shapes": [[int(d) for d in v.aval.shape] for v in eqn.invars],
            "inside_loops": list(loops),
            "equation": str(eqn),
        })
    return sorted(found, key=lambda conv: order.index(conv["layer"]))  # backprop runs last layer first
