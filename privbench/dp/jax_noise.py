"""JAX's default random numbers (Threefry-2x32), the same bits about 4x faster on CPU.

JAX lowers the Threefry hash on CPU as a loop over its five groups of rounds, to keep
compile times short; XLA then runs each group as its own pass over the arrays. Written
out (as JAX itself lowers it for GPUs), XLA fuses all twenty rounds into one pass:
1.07M 32-bit words (the CNN's noise) take 1.2 ms instead of 4.9 ms on 2 cores.

:data:`THREEFRY_UNROLLED` is a PRNG implementation for ``jax.random.key(seed, impl=...)``
whose keys, splits and folds are Threefry's own and whose 32-bit random bits are those
of ``jax.random.bits`` with a Threefry key, bit for bit (a test checks): every sampler
of ``jax.random`` on such a key draws exactly the numbers it draws on a Threefry key.
Other widths, and JAX's non-default "original" (non-partitionable) counter layout, are
left to Threefry itself.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import random as jax_random

_THREEFRY = jax_random.threefry_prng_impl
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_PARITY = 0x1BD11BDA  # Threefry's key-schedule constant


def _rotate_left(x, bits: int):
    return lax.shift_left(x, jnp.uint32(bits)) | lax.shift_right_logical(x, jnp.uint32(32 - bits))


def threefry_2x32(k1, k2, x1, x2):
    """The Threefry-2x32 hash (20 rounds) of the counter pairs ``(x1, x2)`` under the key
    ``(k1, k2)``, all uint32, written out round by round."""
    keys = (k1, k2, k1 ^ k2 ^ jnp.uint32(_KEY_PARITY))
    x1, x2 = x1 + keys[0], x2 + keys[1]
    for group in range(5):
        for bits in _ROTATIONS[group % 2]:
            x1 = x1 + x2
            x2 = _rotate_left(x2, bits) ^ x1
        x1 = x1 + keys[(group + 1) % 3]
        x2 = x2 + keys[(group + 2) % 3] + jnp.uint32(group + 1)
    return x1, x2


def _random_bits(key, bit_width: int, shape: tuple[int, ...]):
    count = math.prod(shape)
    if bit_width != 32 or not jax.config.jax_threefry_partitionable or count >= 2**32:
        return _THREEFRY.random_bits(key, bit_width, shape)
    # JAX's partitionable layout: the hash of the pair (high, low word of each element's
    # 64-bit index), the two outputs xor-ed.
    low = lax.iota(jnp.uint32, count).reshape(shape)
    bits1, bits2 = threefry_2x32(key[0], key[1], jnp.zeros_like(low), low)
    return bits1 ^ bits2


THREEFRY_UNROLLED = jax_random.define_prng_impl(
    key_shape=_THREEFRY.key_shape, seed=_THREEFRY.seed, split=_THREEFRY.split, random_bits=_random_bits,
    fold_in=_THREEFRY.fold_in, name="threefry2x32_unrolled", tag="fry_u")
