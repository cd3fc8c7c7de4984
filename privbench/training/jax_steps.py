"""JAX / Flax NNX training steps.

The model is split once into (graphdef, params, rest) so that each update is a
pure function of arrays, which is what ``jax_privacy.clipped_grad`` needs (it
vmaps the loss over examples) and lets the whole update be one ``jax.jit``.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
from flax import nnx

from privbench import models
from privbench.dp import jax_noise
from privbench.training import dp_methods

# optax.adamw's own default, recorded in the description because it differs
# from torch.optim.AdamW's (1e-2); the published code used each default.
WEIGHT_DECAY = 1e-4


def pure_loss(graphdef, loss_fn):
    """The mean loss as a pure function of (params, rest, inputs, targets)."""

    def loss(params, rest, inputs, targets):
        module = nnx.merge(graphdef, params, rest)
        return loss_fn(module(*inputs), targets)

    return loss


def clipped_grad_sum_jax(
    model_module, loss_fn, inputs, targets, l2_clip_norm, microbatch_size=None
):
    """Sum over the batch of per-example gradients clipped to ``l2_clip_norm``,
    before noise, as an nnx.State shaped like the model's parameters."""
    graphdef, params, rest = nnx.split(model_module, nnx.Param, ...)
    grad_fn = dp_methods.jax_privacy_grad(graphdef, loss_fn, l2_clip_norm, 1.0, microbatch_size)
    # Jitted as in training: un-jitted, the vmap runs op by op and is slow.
    return jax.jit(grad_fn)(params, rest, tuple(inputs), targets)


def jax_device(name: str):
    """A JAX device from a torch-style name ("cpu", "cuda", "cuda:1")."""
    platform, _, index = name.partition(":")
    platform = {"cuda": "gpu"}.get(platform, platform)
    try:
        return jax.devices(platform)[int(index or 0)]
    except (RuntimeError, IndexError, ValueError) as exc:
        raise ValueError(
            f"device {name!r} is not available to JAX (available: "
            f"{', '.join(str(d) for d in jax.devices())})"
        ) from exc


class _Trainer:
    """One jitted update on a batch kept on the device."""

    grad_sample_mode = None

    def __init__(self, *, mode, model, size, batch_size, microbatch_size, settings, seed, device, variant):
        self.mode = mode  # "standard" or a DP method of privbench.training.dp_methods
        family = models.family(model)
        dev = jax_device(device)
        module = models.build("jax", model, size, seed, variant)
        graphdef, params, rest = nnx.split(module, nnx.Param, ...)
        inputs, targets = family.synthetic_batch(size, batch_size, "jax", seed)

        grad_fn = self._grad_fn(graphdef, family.loss_jax, batch_size, microbatch_size, settings)
        tx = self._transform(settings, seed)

        def update(params, opt_state, rest, inputs, targets):
            grads = grad_fn(params, rest, inputs, targets)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        # Donating params/opt_state lets XLA update them in place, as a real
        # training loop would.
        self._update = jax.jit(update, donate_argnums=(0, 1))
        self._params = jax.device_put(params, dev)
        self._opt_state = jax.device_put(tx.init(self._params), dev)
        self._rest = jax.device_put(rest, dev)
        self._batch = jax.device_put((tuple(inputs), targets), dev)
        self.description = {
            "framework": "jax",
            "model": model,
            "size": size,
            "model_variant": variant,
            "mode": self.mode,
            "batch_size": batch_size,
            "param_count": models.count_params("jax", module),
            "device": str(dev),
            "learning_rate": settings["learning_rate"],
            "weight_decay": WEIGHT_DECAY,
            "grad_sample_mode": self.grad_sample_mode,
            "microbatch_size": microbatch_size,
            **self._dp_description(settings),
        }

    def _transform(self, settings, seed):
        return optax.adamw(settings["learning_rate"], weight_decay=WEIGHT_DECAY)

    def step(self):
        self._params, self._opt_state = self._update(
            self._params, self._opt_state, self._rest, *self._batch
        )
        return self._params

    def sync(self, handle) -> None:
        jax.block_until_ready(handle)

    def param_arrays(self) -> list[np.ndarray]:
        """Host copies of the current parameters (for checks, not timing)."""
        return [np.asarray(x) for x in jax.tree.leaves(self._params)]

    def compiled_memory_bytes(self) -> int:
        """The compiled update's tensor memory as XLA plans it: arguments + outputs +
        temporaries, less the outputs that reuse donated arguments."""
        stats = self._update.lower(self._params, self._opt_state, self._rest, *self._batch).compile().memory_analysis()
        return (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
                - stats.alias_size_in_bytes)


class StandardTrainer(_Trainer):
    def _grad_fn(self, graphdef, loss_fn, batch_size, microbatch_size, settings):
        return jax.grad(pure_loss(graphdef, loss_fn))

    def _dp_description(self, settings):
        return {"l2_clip_norm": None, "noise_std_effective": 0.0}


class ClippedTrainer(_Trainer):
    """jax_privacy.clipped_grad (normalize_by=B) -> Gaussian noise -> AdamW."""

    grad_sample_mode = "vmap"
    noise_prng = "threefry2x32"  # JAX's default, as the published code drew its noise

    def _grad_fn(self, graphdef, loss_fn, batch_size, microbatch_size, settings):
        return dp_methods.builder("jax", self.mode)(
            graphdef, loss_fn, settings["l2_clip_norm"], batch_size, microbatch_size
        )

    def _transform(self, settings, seed):
        from jax_privacy import noise_addition

        if settings["noise_std"] == 0:  # clipping alone: drawing zero-scaled noise would cost as much as noise
            return super()._transform(settings, seed)
        # The noise is added to the already-averaged gradient, so its std is
        # noise_std itself (the torch side gets the same via Opacus' scaling).
        privatizer = noise_addition.gaussian_privatizer(
            stddev=settings["noise_std"], prng_key=jax.random.key(seed, impl=self.noise_prng)
        )
        return optax.chain(privatizer, super()._transform(settings, seed))

    def _dp_description(self, settings):
        return {
            "l2_clip_norm": settings["l2_clip_norm"],
            "noise_std_effective": settings["noise_std"],
        }


class FastDPTrainer(ClippedTrainer):
    """Training mode ``fast_dp`` (jax): the clipped mode's update (clipped sum / B,
    Gaussian noise of std noise_std, AdamW) with the clipped sum from the kit's engine
    (``privbench.dp.jax_engine``), whose routes go into the description."""

    grad_sample_mode = None
    noise_prng = jax_noise.THREEFRY_UNROLLED  # the same numbers, drawn faster on CPU

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.description.update(self._grad.describe(self._params, self._rest, *self._batch))

    def _grad_fn(self, graphdef, loss_fn, batch_size, microbatch_size, settings):
        self._grad = super()._grad_fn(graphdef, loss_fn, batch_size, microbatch_size, settings)
        return self._grad
