"""Merging task tensors, PEFT's ``utils/merge_utils.py`` as pure functions over stacked arrays.

A *task tensor* is what one fine-tune changed: an adapter's A or B, a dense update dW, a trained
base leaf minus the base. n of them of one shape are stacked, ``tensors: (n, ...)``, with their
weights ``(n,)``, and merged into one tensor of that shape::

    task_arithmetic   sum_i w_i t_i                                          (Ilharco et al. 2023)
    magnitude_prune   sum_i w_i trim(t_i)
    ties              trim -> elect_sign -> disjoint_merge of w_i t_i        (TIES, Yadav et al. 2023)
    dare_linear       sum_i w_i drop(t_i)                                    (DARE, Yu et al. 2024)
    dare_ties         drop -> elect_sign -> disjoint_merge of w_i t_i

    trim(t)           keep the int(density * t.size) entries largest in |t|, zero the rest
    drop(t)           keep each entry with probability density (a `keep` mask), rescale by 1 / density
    elect_sign        per entry, the sign of sum_i t_i ("total") or of sum_i sign(t_i) ("frequency"),
                      computed on the unweighted (trimmed or dropped) tensors; 0 counts as +
    disjoint_merge    per entry, the mean of the weighted t_i that agree with the elected sign

exactly as PEFT computes them, so ``merge(method, ...)`` equals PEFT's function of the same name
on the same tensors (tests/core/algebra/test_task_vectors.py; DARE with the same keep mask). A density
of 1 or more trims and drops nothing (PEFT's rule). DARE's randomness is an explicit boolean
mask, drawn by `drop_mask` from a PRNG key, so a merge is a pure function of its arguments.

>>> t = jnp.array([[3.0, -1.0, 0.5, 2.0], [-2.0, -2.0, 1.0, 1.0]])
>>> trim(t[0], 0.5).tolist()
[3.0, 0.0, 0.0, 2.0]
>>> elect_sign(t).tolist()
[[True, True, True, True], [False, True, True, True]]
>>> ties(t, jnp.array([1.0, 1.0]), density=1.0).tolist()   # entry 0: only t_0 agrees with +
[3.0, -1.5, 0.75, 1.5]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jlora.errors import ConfigError

METHODS = ("task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")


def _weighted(tensors: jax.Array, weights: jax.Array) -> jax.Array:
    """w_i t_i: (n, ...) times (n,) broadcast over each tensor's own axes."""
    weights = jnp.asarray(weights, tensors.dtype)
    return tensors * weights.reshape(weights.shape + (1,) * (tensors.ndim - 1))


def trim(tensor: jax.Array, density: float) -> jax.Array:
    """`tensor` with all but its ``int(density * size)`` largest-magnitude entries set to 0 (TIES' trim).

    ``density >= 1`` keeps everything; ``density * size < 1`` keeps nothing.
    """
    if density >= 1:
        return tensor
    flat = tensor.reshape(-1)
    k = int(density * flat.size)  # PEFT's count, in Python floats
    if k == 0:
        return jnp.zeros_like(tensor)
    _, index = jax.lax.top_k(jnp.abs(flat), k)
    keep = jnp.zeros(flat.shape, bool).at[index].set(True)
    return jnp.where(keep, flat, 0).reshape(tensor.shape)


def drop_mask(key: jax.Array, shape: tuple[int, ...], density: float) -> jax.Array:
    """A DARE keep mask: each entry True with probability `density`, independently. bool, `shape`."""
    return jax.random.bernoulli(key, density, shape)


def drop(tensor: jax.Array, density: float, keep: jax.Array) -> jax.Array:
    """DARE's drop and rescale: ``tensor * keep / density`` (``density >= 1``: `tensor` unchanged).

    The rescale keeps the expectation: E[drop(t)] = t when keep ~ Bernoulli(density).
    """
    if density >= 1:
        return tensor
    return jnp.where(keep, tensor, 0) / jnp.asarray(density, tensor.dtype)


def elect_sign(tensors: jax.Array, method: str = "total") -> jax.Array:
    """(n, ...) bool: whether each entry of each t_i has the elected sign of its position.

    The sign is that of sum_i t_i ("total", TIES' choice) or of sum_i sign(t_i) ("frequency");
    where the sum is 0 the elected sign is +. A zero entry agrees with neither sign.
    """
    if method not in SIGN_METHODS:
        raise ConfigError(f"unknown majority sign method {method!r}; valid: {', '.join(SIGN_METHODS)}")
    sign = jnp.sign(tensors)
    magnitude = tensors.sum(axis=0) if method == "total" else sign.sum(axis=0)
    return sign == jnp.where(magnitude >= 0, 1, -1).astype(sign.dtype)


def disjoint_merge(weighted: jax.Array, agree: jax.Array) -> jax.Array:
    """Per entry, the mean of the weighted task tensors that agree with the elected sign (0 if none).

    weighted: (n, ...) the w_i t_i. agree: (n, ...) bool from `elect_sign`.
    """
    total = jnp.where(agree, weighted, 0).sum(axis=0)
    return total / jnp.maximum(agree.sum(axis=0), 1).astype(weighted.dtype)


def task_arithmetic(tensors: jax.Array, weights: jax.Array) -> jax.Array:
    """sum_i w_i t_i of (n, ...) tensors and (n,) weights."""
    return _weighted(tensors, weights).sum(axis=0)


def magnitude_prune(tensors: jax.Array, weights: jax.Array, density: float) -> jax.Array:
    """sum_i w_i trim(t_i, density)."""
    return task_arithmetic(jnp.stack([trim(t, density) for t in tensors]), weights)


def ties(tensors: jax.Array, weights: jax.Array, density: float, majority_sign_method: str = "total") -> jax.Array:
    """TIES: trim each t_i to `density`, elect a sign per entry, average the weighted agreeing ones."""
    trimmed = jnp.stack([trim(t, density) for t in tensors])
    return disjoint_merge(_weighted(trimmed, weights), elect_sign(trimmed, majority_sign_method))


def dare_linear(tensors: jax.Array, weights: jax.Array, density: float, keep: jax.Array) -> jax.Array:
    """DARE then task arithmetic: sum_i w_i drop(t_i). keep: (n, ...) bool masks, one per tensor."""
    return task_arithmetic(_dropped(tensors, density, keep), weights)


def dare_ties(
    tensors: jax.Array, weights: jax.Array, density: float, keep: jax.Array, majority_sign_method: str = "total"
) -> jax.Array:
    """DARE then TIES' sign election and disjoint merge (no trim: the drop replaces it)."""
    dropped = _dropped(tensors, density, keep)
    return disjoint_merge(_weighted(dropped, weights), elect_sign(dropped, majority_sign_method))


def _dropped(tensors: jax.Array, density: float, keep: jax.Array | None) -> jax.Array:
    if density >= 1:
        return tensors
    if keep is None or keep.shape != tensors.shape:
        got = None if keep is None else tuple(keep.shape)
        raise ConfigError(f"DARE needs a keep mask of shape {tuple(tensors.shape)} (one per task tensor), got {got}")
    return jnp.stack([drop(t, density, k) for t, k in zip(tensors, keep, strict=True)])


def merge(
    method: str,
    tensors: jax.Array,
    weights: jax.Array,
    *,
    density: float | None = None,
    keep: jax.Array | None = None,
    majority_sign_method: str = "total",
) -> jax.Array:
    """One of `METHODS` on (n, ...) task tensors and (n,) weights -> one tensor (...).

    `density` is needed by every method but task_arithmetic, `keep` ((n, ...) bool) by the DARE
    ones when density < 1, `majority_sign_method` read by the TIES ones.
    """
    if method == "task_arithmetic":
        return task_arithmetic(tensors, weights)
    if method == "magnitude_prune":
        return magnitude_prune(tensors, weights, density)
    if method == "ties":
        return ties(tensors, weights, density, majority_sign_method)
    if method == "dare_linear":
        return dare_linear(tensors, weights, density, keep)
    if method == "dare_ties":
        return dare_ties(tensors, weights, density, keep, majority_sign_method)
    raise ConfigError(f"unknown task-tensor merge {method!r}; valid: {', '.join(METHODS)}")
