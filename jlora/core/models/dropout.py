"""Dropout whose masks cost almost nothing: a counter hash keyed by two words of the step's PRNG key.

Flax's `nn.Dropout` draws one threefry-2x32 uniform per element (20 rounds of the hash for every
two elements, then a float conversion and a compare); on a CPU, GPT-2 small's 37 dropout masks at
8 x 128 tokens were 12 % of a LoRA train step. Here the key gives two 32-bit words (one threefry
call per mask), and each element's word is a strong 32-bit integer hash of its index and those
words (MurmurHash3's finaliser, twice: bijective, full avalanche)::

    s1, s2 = bits(key, (2,))
    h[i]   = fmix32(fmix32(i ^ s1) + s2)          keep x[i] (scaled 1 / (1 - rate)) where h[i] >= rate * 2^32

Integer arithmetic only, so a mask is the same on every machine and under any XLA flags, and a
resumed run draws the masks it would have drawn. Under `jax.vmap` over keys (a population's
members) each key gives its own words and so its own masks; threefry remains the key's generator
for everything else. The drop probability is `rate` to within 2^-32 (Flax's, through a float32
uniform: 2^-23).

>>> x = jnp.ones((4, 1000))
>>> y = dropout(jax.random.key(0), x, 0.25)
>>> round(float((y == 0).mean()), 2), round(float(y.max()), 4)  # a quarter dropped, the rest scaled by 1 / 0.75
(0.24, 1.3333)
>>> bool((dropout(jax.random.key(0), x, 0.25) == y).all())  # a function of the key
True
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 whose every output bit depends on every input bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """(shape) bool: True where an element is kept, each independently with probability 1 - rate."""
    s1, s2 = jax.random.bits(key, (2,), jnp.uint32)
    index = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    h = fmix32(fmix32(index ^ s1) + s2)
    return h >= jnp.uint32(min(round(rate * 2**32), 2**32 - 1))


def dropout(key: jax.Array, x: jax.Array, rate: float) -> jax.Array:
    """Inverted dropout: elements of `x` zeroed with probability `rate`, the rest scaled by 1 / (1 - rate)."""
    if rate == 0.0:
        return x
    if rate == 1.0:
        return jnp.zeros_like(x)
    return jnp.where(keep_mask(key, x.shape, rate), x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


class Dropout(nn.Module):
    """`dropout` as a Flax module, a drop-in for `nn.Dropout` (its key from the "dropout" RNG stream)."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        return dropout(self.make_rng("dropout"), x, self.rate)
