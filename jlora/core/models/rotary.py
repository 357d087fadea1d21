"""Rotary position embeddings (RoPE), as transformers' Llama family computes them.

Each pair of features (i, i + Dh/2) of a query or key head is rotated by the angle
``position * inv_freq[i]``::

    inv_freq[i] = 1 / theta ** (2 i / Dh),  i < Dh / 2          "default"
    inv_freq    = inv_freq / factor                             "linear" (position interpolation)
    inv_freq    = Llama 3's: low frequencies / factor, high ones kept, a smooth ramp between  "llama3"
    x' = x * cos + rotate_half(x) * sin,   rotate_half([x1, x2]) = [-x2, x1]

in float32 whatever the compute dtype, then cast back (as transformers does).

>>> import numpy as np
>>> inv = inv_frequencies(4, 10000.0)
>>> [round(float(x), 4) for x in inv]
[1.0, 0.01]
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jlora.errors import ConfigError

ROPE_TYPES = ("default", "linear", "llama3")


def inv_frequencies(head_dim: int, theta: float, scaling: Mapping | None = None) -> np.ndarray:
    """(Dh / 2,) float32 inverse frequencies of the rotation, with `scaling` (a config's ``rope_scaling``)."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    kind = "default" if not scaling else scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv.astype(np.float32)
    if kind == "linear":
        return (inv / scaling["factor"]).astype(np.float32)
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ConfigError(f"unsupported rope_scaling type {kind!r}; valid: {', '.join(ROPE_TYPES)}")


def rotate(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """x (B, T, H, Dh) rotated by positions (B, T) or (1, T), in float32, returned in x's dtype."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # (B, T, Dh / 2)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # (B, T, 1, Dh)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)
