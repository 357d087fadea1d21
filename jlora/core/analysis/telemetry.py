"""The spectrum of each adapter's update while it trains, and how far its subspace moved since the last look.

Every N steps a run hands `adapter_figures` its adapters now and N steps ago. From the factors
alone (`jlora.core.lora.svd.factored_svd`: QR of B and of A^T, an r x r SVD; never the dense
d_out x d_in dW = scaling * B A), in one compiled call, each adapter gets::

    singular_values   s_1 >= ... >= s_r of dW
    energy            (r,) share of ||dW||_F^2 in the top k, k = 1..r
    effective_rank    exp(entropy of s / sum s)
    norm              ||dW||_F            relative_norm   ||dW||_F / ||W||_F (the columns it adapts)
    phi               (r,) phi(i, i), i = 1..r: the LoRA paper's subspace similarity (eq. 4) between
                      the top-i input directions (right singular vectors) of dW now and N steps ago
    previous_norm     ||dW||_F N steps ago (0 at initialisation, where phi means nothing)

`telemetry_row` turns them into one flat metrics row, per module and as means over modules::

    {"effective_rank/h.0.attn.c_attn": 3.1, "effective_rank/mean": 2.9, "energy_top1/mean": 0.61,
     "singular_values/h.0.attn.c_attn": [...], "phi_top/mean": 0.98, "phi_full/mean": 0.99, ...}

``phi_top`` is phi(1, 1), ``phi_full`` phi(r, r). A population's padded adapters (zero rows of A and
columns of B past a member's rank) give zero singular values there, which change no figure; the
row keeps each member's own r. Adapters of one shape share one vmapped QR/SVD.

>>> import jax, jax.numpy as jnp
>>> a = jax.random.normal(jax.random.key(0), (2, 6)); b = jax.random.normal(jax.random.key(1), (9, 2))
>>> lora = {"h": {"0": {"attn": {"c_attn": {"A": a, "B": b, "scaling": 2.0}}}}}
>>> figs = adapter_figures(lora, lora, {"h.0.attn.c_attn": 10.0})
>>> row = telemetry_row(figs, {"h.0.attn.c_attn": 2})
>>> round(row["phi_full/mean"], 5), bool(jnp.isclose(row["norm/mean"], jnp.linalg.norm(2.0 * b @ a)))
(1.0, True)
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core.lora.adapter import flatten_adapters, output_columns, scaling_of, split_slice
from jlora.core.lora.svd import HIGHEST, factored_svd, spectrum
from jlora.tree import get_path

TOP = (1, 2, 4, 8)
SCALARS = ("effective_rank", "norm", "relative_norm")


def weight_norms(params: Mapping, paths) -> dict[str, jax.Array]:
    """{adapter path: ||W||_F} of the weight columns each adapter updates."""
    out = {}
    for path in paths:
        kernel = get_path(params, split_slice(path)[0])["kernel"]
        w = kernel[:, output_columns(path, kernel.shape[1])]
        out[path] = jnp.linalg.norm(jnp.asarray(w, jnp.float32))
    return out


def _one(a, b, a0, b0, scaling, w_norm) -> dict:
    """The figures of one adapter now (a, b) against N steps ago (a0, b0)."""
    _, s, vt = factored_svd(a, b, scaling)
    _, s0, vt0 = factored_svd(a0, b0, scaling)
    overlap = jnp.matmul(vt, vt0.T, precision=HIGHEST) ** 2  # (r, r): (v_k . v0_l)^2
    i = jnp.arange(1, s.shape[0] + 1)
    captured = jnp.diagonal(jnp.cumsum(jnp.cumsum(overlap, axis=0), axis=1))  # ||V_i^T V0_i||_F^2
    fig = spectrum(s)
    safe = jnp.where(w_norm > 0, w_norm, 1.0)
    return {
        "singular_values": s,
        "energy": fig["energy"],
        "effective_rank": fig["effective_rank"],
        "norm": fig["norm"],
        "relative_norm": jnp.where(w_norm > 0, fig["norm"] / safe, 0.0),
        "phi": jnp.clip(captured / i, 0.0, 1.0),
        "previous_norm": spectrum(s0)["norm"],
    }


@jax.jit
def adapter_figures(lora: Mapping, previous: Mapping, norms: Mapping) -> dict:
    """The figures of every adapter (module doc) from its factors now and N steps ago, compiled.

    Args:
      lora: the adapters now (A (r, d_in), B (d_out, r) and the scale each carries, which also scales
        the factors of N steps ago).
      previous: their factors N steps ago, of the same shapes.
      norms: {adapter path: ||W||_F}, from `weight_norms`.

    Returns:
      {adapter path: {"singular_values" (r,), "energy" (r,), "phi" (r,), "effective_rank", "norm",
      "relative_norm", "previous_norm"}}.
    """
    now, before = flatten_adapters(lora), flatten_adapters(previous)
    groups: dict[tuple, list[str]] = {}
    for path, adapter in now.items():
        groups.setdefault((adapter["A"].shape, adapter["B"].shape), []).append(path)
    out = {}
    for paths in groups.values():
        factors = [jnp.stack([t[p][n].astype(jnp.float32) for p in paths]) for t in (now, before) for n in "AB"]
        scalings = {p: scaling_of(now[p], p) for p in paths}
        values = [jnp.stack([jnp.asarray(d[p], jnp.float32) for p in paths]) for d in (scalings, norms)]
        figs = jax.vmap(_one)(*factors, *values)
        out.update({p: {name: value[n] for name, value in figs.items()} for n, p in enumerate(paths)})
    return out


def telemetry_row(figures: Mapping, ranks: Mapping[str, int], *, with_phi: bool = True) -> dict:
    """One flat metrics row from `adapter_figures`: ``"{figure}/{module}"`` and ``"{figure}/mean"``.

    Args:
      figures: one adapter set's figures (host or device arrays).
      ranks: {adapter path: r}, the true rank (a padded population member's own).
      with_phi: report phi (False when the previous adapters are not from exactly N steps ago);
        it is left out anyway for a module whose previous update was zero.
    """
    figures = jax.device_get(figures)
    row: dict = {}
    scalars: dict[str, list[float]] = {}

    def put(name: str, path: str, value: float) -> None:
        row[f"{name}/{path}"] = float(value)
        scalars.setdefault(name, []).append(float(value))

    for path, fig in figures.items():
        r = ranks[path]
        energy = np.asarray(fig["energy"])
        row[f"singular_values/{path}"] = np.asarray(fig["singular_values"])[:r].astype(float).tolist()
        for name in SCALARS:
            put(name, path, fig[name])
        for k in TOP:
            if k <= r:
                put(f"energy_top{k}", path, energy[k - 1])
        if with_phi and float(fig["previous_norm"]) > 0:
            phi = np.asarray(fig["phi"])
            put("phi_top", path, phi[0])
            put("phi_full", path, phi[r - 1])
    row.update({f"{name}/mean": float(np.mean(values)) for name, values in scalars.items()})
    return row
