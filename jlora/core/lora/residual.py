"""PiSSA and OLoRA: adapters that start from the weight itself, on a residual base.

Plain LoRA starts at B = 0 and leaves W alone. PiSSA (Meng et al. 2024) and OLoRA
(Büyükakyüz 2024) put a rank-r part of W (d_out x d_in) into the adapter and train it, and
replace the base by what is left, so the model is unchanged at step 0 (s = scaling)::

    PiSSA   W ~ U_r S_r V_r^T (top r)    A = sqrt(S_r / s) V_r^T  (r, d_in)   B = U_r sqrt(S_r / s)  (d_out, r)
    OLoRA   W = Q R (reduced QR)         A = R[:r]                (r, d_in)   B = Q[:, :r]           (d_out, r)
    base    W_res = W - s B0 A0          so W_res + s B0 A0 = W

as PEFT's ``pissa_init`` / ``olora_init`` do on a Linear weight (d_out, d_in).
``init="pissa_niter_K"`` takes U_r, S_r, V_r from a randomised SVD instead (Halko et al. 2009,
Algorithm 4.4, as ``torch.svd_lowrank`` which PEFT calls: r columns, K power iterations).

The residual base is part of the model, so a checkpoint identifies it by the original base
(its hash) and the initial factors A0, B0 (the ``init`` tree, ``{path: {"A", "B"}}`` like the
LoRA tree); `residual_params` rebuilds W_res from them, the same function training used, so
resuming, loading and generating see the very weights the run trained on.

To share such an adapter, PEFT converts it (``save_pretrained(...,
path_initial_model_for_weight_conversion=...)``) into an ordinary LoRA on the unmodified base::

    W_res + s B A = W + s (B A - B0 A0) = W + s [B, -B0] [A; A0]      (rank 2r)

with alpha doubled (times sqrt 2 under rsLoRA) so the scaling stays s; `as_plain_lora` does
the same (DoRA's magnitude, if any, is carried over unchanged: the weight it normalises is
the same W + s dW).

>>> import jax, jax.numpy as jnp
>>> from jlora.core.lora.config import LoraConfig
>>> params = {"h": {"0": {"attn": {"c_attn": {"kernel": jax.random.normal(jax.random.key(0), (8, 24))}}}}}
>>> residual, lora = init_adapters(jax.random.key(1), LoraConfig(r=2, alpha=4, init="pissa"), params)
>>> w = params["h"]["0"]["attn"]["c_attn"]["kernel"]
>>> a, b = lora["h"]["0"]["attn"]["c_attn"]["A"], lora["h"]["0"]["attn"]["c_attn"]["B"]
>>> bool(jnp.allclose(residual["h"]["0"]["attn"]["c_attn"]["kernel"] + 2.0 * (b @ a).T, w, atol=1e-5))
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from jlora.core.lora.adapter import (
    as_lora_config,
    flatten_adapters,
    init_lora,
    output_columns,
    split_slice,
    unflatten_adapters,
    with_magnitudes,
    with_scaling,
)
from jlora.core.lora.config import LoraConfig
from jlora.core.lora.merge import unmerge
from jlora.errors import ConfigError
from jlora.tree import get_path

HIGHEST = jax.lax.Precision.HIGHEST


def _mm(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.matmul(x, y, precision=HIGHEST)


@partial(jax.jit, static_argnums=(1, 2))
def randomized_svd(w: jax.Array, r: int, niter: int, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """An approximate top-r SVD of w (m, n): (u (m, r), s (r,), vt (r, n)), as ``torch.svd_lowrank(w, r, niter)``.

    A Gaussian sketch of r columns drawn from `key`, then `sketched_svd`.
    """
    n = min(w.shape)  # the sketch multiplies w's tall form (m >= n) from the right
    return sketched_svd(w, jax.random.normal(key, (n, r), w.dtype), niter)


@partial(jax.jit, static_argnums=2)
def sketched_svd(w: jax.Array, sketch: jax.Array, niter: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The randomised SVD of w (m, n) from a given Gaussian sketch (min(m, n), r): (u (m, r), s (r,), vt (r, n)).

    `niter` power (subspace) iterations, then the exact SVD of the r-row projection (Halko et al. 2009,
    Algorithms 4.4 and 5.1), step for step as ``torch.svd_lowrank``: the same sketch gives its result.
    """
    transposed = w.shape[0] < w.shape[1]
    a = w.T if transposed else w  # (m >= n)
    q = jnp.linalg.qr(_mm(a, sketch.astype(a.dtype)))[0]
    for _ in range(niter):
        q = jnp.linalg.qr(_mm(a.T, q))[0]
        q = jnp.linalg.qr(_mm(a, q))[0]
    u, s, vt = jnp.linalg.svd(_mm(q.T, a), full_matrices=False)
    u = _mm(q, u)
    return (vt.T, s, u.T) if transposed else (u, s, vt)


@partial(jax.jit, static_argnums=1, static_argnames="niter")
def pissa_factors(
    w: jax.Array, r: int, scaling: float, *, niter: int | None = None, key: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """PiSSA's (A (r, d_in), B (d_out, r)) of w (d_out, d_in): s B A is W's best rank-r part.

    `niter` None: the exact SVD; an integer: `randomized_svd` with that many power
    iterations, drawn from `key`.
    """
    w = w.astype(jnp.float32)
    if niter is None:
        u, s, vt = jnp.linalg.svd(w, full_matrices=False)
        u, s, vt = u[:, :r], s[:r], vt[:r]
    else:
        u, s, vt = randomized_svd(w, r, niter, key)
    root = jnp.sqrt(s / scaling)
    return root[:, None] * vt, u * root[None, :]


@partial(jax.jit, static_argnums=1)
def olora_factors(w: jax.Array, r: int) -> tuple[jax.Array, jax.Array]:
    """OLoRA's (A (r, d_in), B (d_out, r)) of w (d_out, d_in): the first r rows of R and columns of Q."""
    q, rr = jnp.linalg.qr(w.astype(jnp.float32))
    return rr[:r], q[:, :r]


def initial_factors(key: jax.Array, cfg: LoraConfig, params: Mapping) -> dict[str, dict[str, jax.Array]]:
    """{adapter path: {"A", "B"}}: the factors PiSSA / OLoRA take from each adapted weight (float32).

    Each adapter draws from ``fold_in(key, index)`` in path order (only the randomised SVD
    draws). Raises ConfigError if a rank exceeds min(d_out, d_in) of its weight.
    """
    if cfg.init == "lora_ga":
        raise ConfigError(
            "LoRA-GA's factors come from gradients: jlora.core.lora.lora_ga.lora_ga_init(key, cfg, params, grads), "
            "then init_adapters(key, cfg, params, init=those factors)"
        )
    flat = {}
    for i, path in enumerate(cfg.module_paths(params)):
        kernel = get_path(params, split_slice(path)[0])["kernel"]
        w = kernel[:, output_columns(path, kernel.shape[1])].T  # (d_out, d_in)
        r = cfg.rank_for(path)
        if r > min(w.shape):
            raise ConfigError(
                f"LoRA init {cfg.init!r} needs r <= min(d_out, d_in) = {min(w.shape)} at {path}, got r={r}"
            )
        if cfg.init == "olora":
            a, b = olora_factors(w, r)
        else:
            scaling = cfg.scaling_for(path, r=r)
            a, b = pissa_factors(w, r, scaling, niter=cfg.power_iterations, key=jax.random.fold_in(key, i))
        flat[path] = {"A": a, "B": b}
    return flat


def residual_params(params: Mapping, init: Mapping, cfg: LoraConfig) -> dict:
    """The residual base W_res = W - s B0 A0 for every adapter of `init` (a LoRA-shaped tree of A0, B0).

    Float32 accumulation and one cast to each kernel's dtype (`jlora.core.lora.merge.unmerge`).
    """
    return unmerge(params, with_scaling(init, cfg))


def init_adapters(
    key: jax.Array, model_or_cfg: Any, params: Mapping, *, init: Mapping | None = None
) -> tuple[dict, dict]:
    """(params, lora) to train from, for any init: the base the adapters go with, and the adapters.

    For the inits that leave the base alone this is ``(params, init_lora(key, cfg, params))``.
    For PiSSA / OLoRA: the residual base and the factors taken from W (with DoRA, m = the
    norms of W_res + s B0 A0 = W), so the adapted model equals the original at step 0.

    Args:
      key: as `init_lora`'s (only the randomised SVD draws from it).
      model_or_cfg: a `LoraConfig`, or a model carrying one.
      params: the original base tree.
      init: the initial factors to use instead of computing them (a checkpoint's ``init``
        tree), so a resumed or reloaded run gets the very residual it trained on.
    """
    cfg = as_lora_config(model_or_cfg)
    if not cfg.changes_base:
        return params, init_lora(key, cfg, params)
    flat = initial_factors(key, cfg, params) if init is None else flatten_adapters(init)
    residual = residual_params(params, unflatten_adapters(flat), cfg)
    flat = with_scaling(flat, cfg, flat=True)
    return residual, unflatten_adapters(with_magnitudes(flat, residual) if cfg.use_dora else flat)


def factors_of(lora: Mapping) -> dict:
    """The A and B of every adapter (what a PiSSA / OLoRA checkpoint keeps of the initial adapters)."""
    return unflatten_adapters({p: {"A": a["A"], "B": a["B"]} for p, a in flatten_adapters(lora).items()})


def as_plain_lora(lora: Mapping, init: Mapping, cfg: LoraConfig) -> tuple[dict, LoraConfig]:
    """A PiSSA / OLoRA adapter as an ordinary LoRA of rank 2r on the unmodified base (PEFT's conversion).

    Args:
      lora: the trained adapters (on the residual base). init: the initial factors A0, B0.
      cfg: their config (a base-changing init).
    Returns:
      (lora', cfg'): A' = [A; A0] (2r, d_in), B' = [B, -B0] (d_out, 2r), the scale and DoRA's m unchanged;
      cfg' with r, rank_pattern doubled, alpha, alpha_pattern times 2 (sqrt 2 with rsLoRA) and
      a plain init, so every scaling is the same and W + s' B' A' = W_res + s B A.
    """
    first = flatten_adapters(init)
    plain = {}
    for path, adapter in flatten_adapters(lora).items():
        a0, b0 = first[path]["A"], first[path]["B"]
        plain[path] = {
            **adapter,
            "A": jnp.concatenate([adapter["A"], a0.astype(adapter["A"].dtype)], axis=0),
            "B": jnp.concatenate([adapter["B"], -b0.astype(adapter["B"].dtype)], axis=1),
        }
    factor = math.sqrt(2) if cfg.rslora else 2.0
    plain_cfg = cfg.replace(
        r=2 * cfg.r,
        alpha=factor * cfg.alpha,
        rank_pattern={k: 2 * v for k, v in cfg.rank_pattern.items()},
        alpha_pattern={k: factor * v for k, v in cfg.alpha_pattern.items()},
        init="kaiming",
    )
    return unflatten_adapters(plain), plain_cfg
