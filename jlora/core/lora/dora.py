"""DoRA (Liu et al. 2024): the adapted weight split into a trained magnitude and a direction.

For a frozen weight W (d_out x d_in) and a LoRA update scaling * B A, DoRA trains a magnitude
m (d_out,) beside A and B, and uses, per output feature j (a row of W, a column of GPT-2's
Conv1D kernel)::

    W'_j = m_j * (W_j + s (B A)_j) / n_j,      n_j = ||W_j + s (B A)_j||,   s = scaling
    m_j  = ||W_j|| at initialisation (B = 0), so W' = W at step 0

n is treated as a constant in the backward pass (paper section 4.3, and PEFT): gradients
reach m through m / n and A, B through the LoRA path, never through the norm. The bias is
added after the scaling, as in PEFT. The adapter is ``{"A": (r, d_in), "B": (d_out, r),
"m": (d_out,)}`` in the LoRA tree; PEFT saves m as ``lora_magnitude_vector``.

The norm needs no dense (d_out x d_in) matrix per step::

    n_j^2 = ||W_j||^2 + 2 s (W A^T)_j . B_j + s^2 B_j (A A^T) B_j^T
            (d_out,)     W A^T: (d_out, r)     A A^T: (r, r)

which costs r d_in d_out multiply-adds (the product W A^T), about r / N of the layer's
matmul on N tokens. The output, for an input x (rows) and its LoRA-dropped copy x_d::

    no dropout:  y = (m / n) * (x W^T + s x A^T B^T) + b
    dropout:     y = x W^T + b + (m / n - 1) * (x_d W^T) + (m / n) * s x_d A^T B^T     (PEFT's form)

PEFT's training form with dropout passes the dropped input through the base weight a second
time; jlora does the same, so the two train the same model.

>>> import jax.numpy as jnp
>>> kernel = jnp.array([[3.0, 0.0], [4.0, 1.0]])        # (d_in, d_out): W's rows are its columns
>>> column_norm(kernel, jnp.zeros((1, 2)), jnp.zeros((2, 1)), 2.0)   # ||W_j||: the initial m
Array([5., 1.], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST  # the norm subtracts large terms: no reduced-precision passes


@jax.jit
def column_norm(kernel: jax.Array, a: jax.Array, b: jax.Array, scaling: float) -> jax.Array:
    """n = ||W_j + s (B A)_j|| for every output feature j, from the factors, in float32.

    Args:
      kernel: (d_in, d_out), GPT-2's Conv1D layout (W = kernel.T).
      a: (r, d_in). b: (d_out, r). scaling: s.
    Returns:
      (d_out,).
    """
    w = kernel.astype(jnp.float32)
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    mm = lambda x, y: jnp.matmul(x, y, precision=HIGHEST)  # noqa: E731
    w_sq = jnp.sum(w * w, axis=0)  # ||W_j||^2
    cross = jnp.sum(mm(a, w).T * b, axis=1)  # (W A^T)_j . B_j
    quad = jnp.sum(mm(b, mm(a, a.T)) * b, axis=1)  # B_j (A A^T) B_j^T
    return jnp.sqrt(jnp.maximum(w_sq + 2.0 * scaling * cross + scaling**2 * quad, 0.0))


def magnitude_scale(kernel: jax.Array, adapter: Mapping, scaling: float) -> jax.Array:
    """m / n, (d_out,) in float32: the factor DoRA puts on each output feature."""
    return adapter["m"].astype(jnp.float32) / column_norm(kernel, adapter["A"], adapter["B"], scaling)


def dora_output(
    base: jax.Array,
    delta: jax.Array,
    kernel: jax.Array,
    adapter: Mapping,
    scaling: float,
    x_dropped: jax.Array | None = None,
) -> jax.Array:
    """The DoRA layer's output without its bias, (..., d_out).

    Args:
      base: x W^T = x @ kernel, (..., d_out), as the layer computed it.
      delta: the LoRA path s x_d A^T B^T on the (dropped) input, (..., d_out).
      kernel: (d_in, d_out). adapter: {"A", "B", "m"}. scaling: s.
      x_dropped: (..., d_in) the LoRA-dropped input when dropout is active (None: off, x_d = x).
    """
    inv_norm = jax.lax.stop_gradient(1.0 / column_norm(kernel, adapter["A"], adapter["B"], scaling))
    g = (adapter["m"].astype(jnp.float32) * inv_norm).astype(base.dtype)  # m / n: a gradient to m only
    if x_dropped is None:
        return g * (base + delta)
    return base + (g - 1) * (x_dropped @ kernel.astype(base.dtype)) + g * delta
