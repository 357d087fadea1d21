"""LoRA-GA (Wang et al. 2024, arXiv 2407.05000): A and B from the SVD of the full weight's gradient, on a
residual base, as PEFT's ``lora_ga_init`` (``peft/tuners/lora/layer.py``) computes them.

The first update of plain LoRA (B = 0) moves only B, along a random projection of the gradient. LoRA-GA
starts the adapter so that its first step approximates full fine-tuning's: from G, the gradient of the
loss w.r.t. W (d_out, d_in) averaged over a few batches::

    G ~ U S V^T               a randomised SVD, q = min(4r, d_out, d_in) columns, 4 power iterations
    "ArB2r" (the default):    A = V[:, :r]^T            (r, d_in)      B = U[:, r:2r] S[r:2r]   (d_out, r)
    "stable" scale:           B *= d_out^(1/4) / sqrt(stable_gamma)
    base                      W_res = W - s B A         so the model is unchanged at step 0

The base becomes a residual, as under PiSSA: a checkpoint keeps A0, B0, from which
`jlora.core.lora.residual` rebuilds W_res, and the PEFT export is the rank-2r LoRA on the unmodified base
(`jlora.core.lora.residual.as_plain_lora`, as PEFT's ``path_initial_model_for_weight_conversion``).

The SVD's singular vectors are defined up to sign, and A and B take vectors of different indices
(V's first r, U's next r), so B A depends on the signs the LAPACK build returns: jlora fixes them (each
column of U has its largest entry positive, scikit-learn's ``svd_flip``).

>>> import jax, jax.numpy as jnp
>>> from jlora.core.lora.config import LoraGAConfig
>>> g = jax.random.normal(jax.random.key(0), (12, 8))
>>> a, b = lora_ga_factors(g, 2, 2.0, LoraGAConfig(), key=jax.random.key(1))
>>> a.shape, b.shape, bool(jnp.allclose(a @ a.T, jnp.eye(2), atol=1e-5))
((2, 8), (12, 2), True)
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jlora.core.lora.adapter import output_columns, split_slice
from jlora.core.lora.config import LoraConfig, LoraGAConfig
from jlora.core.lora.residual import sketched_svd
from jlora.errors import ConfigError
from jlora.tree import get_path

NITER = 4  # PEFT's svd_lowrank(..., niter=4)


def sketch_size(shape: tuple[int, int], r: int) -> tuple[int, int]:
    """The shape of the Gaussian sketch of LoRA-GA's SVD of a (d_out, d_in) gradient: (min dim, min(4r, min dim))."""
    return min(shape), min(4 * r, min(shape))


def flip_signs(u: jax.Array, vt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(u, vt) with each column of u (and the row of vt with it) signed so its largest entry is positive."""
    signs = jnp.sign(u[jnp.abs(u).argmax(axis=0), jnp.arange(u.shape[1])])
    return u * signs[None, :], vt * signs[:, None]


def lora_ga_factors(
    grad: jax.Array,
    r: int,
    scaling: float,
    cfg: LoraGAConfig,
    *,
    weight: jax.Array | None = None,
    key: jax.Array | None = None,
    sketch: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """LoRA-GA's (A (r, d_in), B (d_out, r)) from the averaged gradient `grad` (d_out, d_in) of W, in float32.

    Args:
      grad: the gradient of W in the maths' layout (d_out, d_in).
      r: the adapter's rank (2r <= min(d_out, d_in)). scaling: its scale s (for "gd_scale").
      cfg: direction, scale and stable_gamma.
      weight: W (d_out, d_in), for the "weight_svd" scale.
      key: draws the SVD's sketch (and "random"'s choice of vectors).
      sketch: the sketch itself, `sketch_size(grad.shape, r)` (instead of drawing it from `key`).
    """
    grad = grad.astype(jnp.float32)
    if sketch is None:
        sketch = jax.random.normal(jax.random.fold_in(key, 0), sketch_size(grad.shape, r), jnp.float32)
    u, s, vt = sketched_svd(grad, sketch, NITER)
    u, vt = flip_signs(u, vt)
    u, s, vt = u[:, : 2 * r], s[: 2 * r], vt[: 2 * r]
    if cfg.direction == "ArBr":  # A the odd indices, B the even ones
        a_index, b_index = jnp.arange(1, 2 * r, 2), jnp.arange(0, 2 * r, 2)
    elif cfg.direction == "A2rBr":
        a_index, b_index = jnp.arange(r, 2 * r), jnp.arange(r)
    elif cfg.direction == "ArB2r":
        a_index, b_index = jnp.arange(r), jnp.arange(r, 2 * r)
    else:  # "random": the same r indices for both
        a_index = b_index = jax.random.permutation(jax.random.fold_in(key, 1), 2 * r)[:r]
    a = vt[a_index]
    s_b = s[b_index]
    b = u[:, b_index] * s_b[None, :]
    if cfg.scale == "stable":
        b = b * (grad.shape[0] ** 0.25 / cfg.stable_gamma**0.5)
    elif cfg.scale == "weight_svd":
        top = jnp.linalg.norm(weight.astype(jnp.float32), ord=2)  # W's largest singular value (PEFT: svd_lowrank)
        b = jnp.where(s_b[0] > 0, b * top / jnp.where(s_b[0] > 0, s_b[0], 1.0), b)
    elif cfg.scale == "gd_scale":
        a, b = a / scaling, b / scaling
    return a, b


def lora_ga_init(key: jax.Array, cfg: LoraConfig, params: Mapping, grads: Mapping[str, jax.Array]) -> dict:
    """{adapter path: {"A", "B"}}: LoRA-GA's initial factors of every adapter `cfg` makes in `params`.

    `grads` holds the averaged gradient of each adapted module's kernel, {module path: (d_in, d_out)} in the
    kernel's layout (`jlora.core.update.probes.weight_gradients`); a q/k/v slice adapter takes its columns.
    Each adapter draws from ``fold_in(key, index)`` in path order. `jlora.core.lora.residual.init_adapters`
    with ``init=`` these factors makes the residual base and the adapters.
    """
    flat = {}
    for i, path in enumerate(cfg.module_paths(params)):
        module = split_slice(path)[0]
        kernel = get_path(params, module)["kernel"]
        columns = output_columns(path, kernel.shape[1])
        g, w = grads[module][:, columns].T, kernel[:, columns].T  # (d_out, d_in)
        r = cfg.rank_for(path)
        if 2 * r > min(w.shape):
            raise ConfigError(
                f"LoRA-GA takes 2r singular vectors of the gradient: r={r} at {path} needs 2r <= {min(w.shape)}"
            )
        a, b = lora_ga_factors(g, r, cfg.scaling_for(path, r), cfg.lora_ga, weight=w, key=jax.random.fold_in(key, i))
        flat[path] = {"A": a, "B": b}
    return flat
