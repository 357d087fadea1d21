"""A D x d random projection applied in O(D log d), never formed: the Fastfood transform.

Le, Sarlos and Smola (2013) replace a dense Gaussian matrix by products of diagonal matrices,
a permutation and Walsh-Hadamard transforms. jlora uses it as the projection P of training in a
random subspace (`jlora.research.intrinsic`: theta = theta_0 + P z), as Li et al. (2018) and
Aghajanyan et al. (2021) do::

    z (d,) ─pad─> (L,) ─┬─ block 0:  S_0 H G_0 Pi_0 H B_0 ─┐
                        ├─ block 1:  S_1 H G_1 Pi_1 H B_1 ─┼─ stacked (n L,) ─ first D ─> P z (D,)
                        └─ ...  n = ceil(D / L) blocks    ─┘

    L       the block size, the power of two >= d (so d <= L; any d' <= L reads P's first d' columns)
    B_b     diag of random signs +-1
    H       the L x L Walsh-Hadamard matrix (Sylvester order, entries +-1, H H^T = L I), applied as
            log2(L) butterflies of adds and subtracts on reshaped axes: O(L log L), never a matrix
    Pi_b    a random permutation, (Pi v)_i = v[perm_i]
    G_b     diag of N(0, 1) draws
    S_b     the scalar 1 / (||G_b|| sqrt(D))

The convention is the reference implementations' (uber-research/intrinsic-dimension, and
Aghajanyan et al.'s `fastfood_torched`): H unnormalised, and each block divided by
``sqrt(L ||G_b||^2) * sqrt(D / L)``. Every column of ``H G_b Pi_b H B_b`` has norm exactly
``sqrt(L) ||G_b||`` (H B_b e_j is a +-1 vector, Pi_b keeps that, G_b makes its norm ||G_b||, H
multiplies it by sqrt(L)), so after S_b each block's columns have norm sqrt(L / D), and the stacked
columns norm 1 exactly when L divides D, about 1 otherwise (the last block is cut). Le et al.'s S
is a chi-distributed diagonal that makes rows look Gaussian for kernel approximation; a random
subspace needs only the columns' scale. Blocks of size L >= d rather than one block of size >= D
(the references' choice) cost O(D log d) instead of O(D log D); both are the same transform for
D <= L.

>>> import jax, jax.numpy as jnp
>>> ff = fastfood(jax.random.key(0), size=40, d=5)        # L = 8, 5 blocks
>>> ff.block, ff.n_blocks, project(ff, jnp.ones(5)).shape
(8, 5, (40,))
>>> round(float(jnp.linalg.norm(project(ff, jnp.eye(8)[2]))), 5)   # L divides D: unit columns, exactly
1.0
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from jlora.errors import ConfigError


def hadamard(x: jax.Array) -> jax.Array:
    """x @ H along the last axis, H the unnormalised Walsh-Hadamard matrix of Sylvester order.

    x: (..., L) with L a power of two. One butterfly per bit of the index: the axis of size L is
    viewed as log2(L) axes of size 2, and along each ``(a, b) -> (a + b, a - b)``; the result is
    ``H_2 ⊗ H_2 ⊗ ... ⊗ H_2`` applied to x, which is symmetric, so x @ H = H x.

    >>> hadamard(jnp.array([1.0, 0.0, 0.0, 0.0])).tolist(), hadamard(jnp.array([0.0, 1.0, 0.0, 0.0])).tolist()
    ([1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 1.0, -1.0])
    """
    size = x.shape[-1]
    if size & (size - 1):
        raise ValueError(f"the Walsh-Hadamard transform needs a power-of-two length, got {size}")
    bits, lead = size.bit_length() - 1, x.shape[:-1]
    y = x.reshape(*lead, *([2] * bits))
    for axis in range(len(lead), len(lead) + bits):
        a, b = jnp.take(y, 0, axis=axis), jnp.take(y, 1, axis=axis)
        y = jnp.stack([a + b, a - b], axis=axis)
    return y.reshape(x.shape)


class Fastfood(struct.PyTreeNode):
    """The random draws of one Fastfood projection, (n, L) each: n blocks of size L.

    Attributes:
      signs: B's diagonals, +-1 float32.
      perm: Pi's permutations, int32: block b's output i reads its input ``perm[b, i]``.
      gauss: G's diagonals, N(0, 1) float32.
      size: D, the length of P z (static).
    """

    signs: jax.Array
    perm: jax.Array
    gauss: jax.Array
    size: int = struct.field(pytree_node=False)

    @property
    def block(self) -> int:
        """L: the block size, and the largest d whose z the projection reads."""
        return self.signs.shape[1]

    @property
    def n_blocks(self) -> int:
        return self.signs.shape[0]

    @property
    def scale(self) -> jax.Array:
        """(n,) S_b = 1 / (||G_b|| sqrt(D)): unit columns (see the module docstring)."""
        return 1.0 / (jnp.linalg.norm(self.gauss, axis=1) * math.sqrt(self.size))


def block_size(d: int) -> int:
    """L = the smallest power of two >= d.

    >>> [block_size(d) for d in (1, 2, 3, 64, 65)]
    [1, 2, 4, 64, 128]
    """
    return 1 << max(d - 1, 0).bit_length()


def fastfood(key: jax.Array, size: int, d: int) -> Fastfood:
    """A Fastfood projection from d (or fewer) dimensions to `size` = D: ceil(D / L) blocks, L = `block_size(d)`."""
    if not (isinstance(size, int) and isinstance(d, int) and size >= 1 and d >= 1):
        raise ConfigError(f"a projection needs D >= 1 and d >= 1, got D={size!r}, d={d!r}")
    length = block_size(d)
    n = -(-size // length)
    k_signs, k_perm, k_gauss = jax.random.split(key, 3)
    signs = jnp.where(jax.random.bernoulli(k_signs, 0.5, (n, length)), 1.0, -1.0).astype(jnp.float32)
    perm = jax.vmap(lambda k: jax.random.permutation(k, length))(jax.random.split(k_perm, n)).astype(jnp.int32)
    gauss = jax.random.normal(k_gauss, (n, length), jnp.float32)
    return Fastfood(signs, perm, gauss, size)


def project(ff: Fastfood, z: jax.Array) -> jax.Array:
    """P z: (D,) float32 from z (d,) with d <= L (z is zero-padded to L: P's first d columns).

    O(D log L) adds and multiplies; differentiable (the transpose of each factor is as cheap).
    """
    d = z.shape[-1]
    if d > ff.block:
        raise ValueError(f"z has {d} entries; this projection reads at most L = {ff.block}")
    z = jnp.pad(z.astype(jnp.float32), (0, ff.block - d))
    v = hadamard(ff.signs * z[None, :])  # H B z, every block at once: (n, L)
    v = jnp.take_along_axis(v, ff.perm, axis=1) * ff.gauss  # G Pi H B z
    v = hadamard(v) * ff.scale[:, None]  # S H G Pi H B z
    return v.reshape(-1)[: ff.size]
