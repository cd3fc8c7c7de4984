"""privbench.dp.jax_noise: the unrolled Threefry draws JAX's own numbers, bit for bit,
and the kit's JAX trainer (fast_dp) draws its noise with it without changing a step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from privbench.dp.jax_noise import THREEFRY_UNROLLED


def _same(a, b) -> None:
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("seed", [0, 2**31 - 1])
@pytest.mark.parametrize("shape", [(), (3, 4, 7), (100_003,)])
def test_every_sampler_draws_threefrys_numbers(seed, shape):
    default, unrolled = jax.random.key(seed), jax.random.key(seed, impl=THREEFRY_UNROLLED)
    _same(jax.random.key_data(jax.random.split(default, 3)), jax.random.key_data(jax.random.split(unrolled, 3)))
    _same(jax.random.key_data(jax.random.fold_in(default, 7)), jax.random.key_data(jax.random.fold_in(unrolled, 7)))
    for sample in (lambda k: jax.random.normal(k, shape), lambda k: jax.random.uniform(k, shape),
                   lambda k: jax.random.bits(k, shape, jnp.uint32), lambda k: jax.random.bits(k, shape, jnp.uint16),
                   lambda k: jax.random.normal(jax.random.split(k)[1], shape, jnp.bfloat16)):
        _same(sample(default), sample(unrolled))
        _same(jax.jit(sample)(default), jax.jit(sample)(unrolled))


def test_fast_dp_steps_equal_those_with_threefry_keys(monkeypatch):
    from privbench.training import jax_steps, make_trainer

    def params_after_two_steps():
        trainer = make_trainer("jax", "cnn", "tiny", "fast_dp", 4, seed=3)
        for _ in range(2):
            trainer.sync(trainer.step())
        return trainer.param_arrays()

    unrolled = params_after_two_steps()
    monkeypatch.setattr(jax_steps.FastDPTrainer, "noise_prng", "threefry2x32")
    for a, b in zip(unrolled, params_after_two_steps()):
        _same(a, b)
