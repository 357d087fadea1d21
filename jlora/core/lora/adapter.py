"""The LoRA tree: its layout, its initialisation and the update it adds.

The model's variables are two separate pytrees::

    {"params": base,   # the checkpoint's tree, frozen
     "lora":   lora}   # the adapters, trained

`lora` mirrors `params`: the adapter of the weight ``params["h"]["0"]["attn"]["c_attn"]
["kernel"]`` (stored (d_in, d_out), as GPT-2's Conv1D) lives at
``lora["h"]["0"]["attn"]["c_attn"] = {"A": (r, d_in), "B": (d_out, r)}``, in the maths'
(and PEFT's) layout. A slice adapter of the fused q, k, v projection sits one level down,
``lora[...]["c_attn"]["q"] = {"A": (r, D), "B": (D, r)}``. So one path names a module
everywhere, and `flatten_adapters` gives ``{"h.0.attn.c_attn": {"A": ..., "B": ...}}``.
An adapter may hold more than A and B, and every function here carries its other leaves
along: DoRA's magnitude ``"m": (d_out,)`` (`jlora.core.lora.dora`) sits beside them.

`init_lora` makes the adapters whose B starts at 0 (the base is untouched); PiSSA and
OLoRA start from the weight itself and change the base, so `jlora.core.lora.residual.init_adapters`
makes those (with the residual base).

>>> import jax, jax.numpy as jnp
>>> params = {"h": {"0": {"attn": {"c_attn": {"kernel": jnp.zeros((4, 12))}}}}}
>>> lora = init_lora(jax.random.key(0), LoraConfig(r=2, alpha=4), params)
>>> {p: (a["A"].shape, a["B"].shape) for p, a in flatten_adapters(lora).items()}
{'h.0.attn.c_attn': ((2, 4), (12, 2))}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jlora.core.lora.config import QKV, LoraConfig
from jlora.core.lora.dora import column_norm
from jlora.errors import ConfigError
from jlora.tree import get_path, unflatten

PyTree = Any
Adapter = dict  # {"A": (r, d_in), "B": (d_out, r)[, "m": (d_out,) for DoRA]}


def flatten_adapters(lora: Mapping) -> dict[str, Adapter]:
    """{dotted module path: adapter} for every adapter in a LoRA tree, in tree order.

    An adapter is the node holding "A" and "B", with whatever else it holds (DoRA's "m").
    """
    flat: dict[str, Adapter] = {}

    def walk(node: Mapping, prefix: str) -> None:
        if "A" in node and "B" in node:
            flat[prefix] = dict(node)
            return
        for name, child in node.items():
            walk(child, f"{prefix}.{name}" if prefix else name)

    walk(lora, "")
    return flat


def unflatten_adapters(flat: Mapping[str, Adapter]) -> dict:
    """Inverse of `flatten_adapters`."""
    return unflatten(flat)


def adapters_by_module(lora: Mapping) -> dict[str, dict[str, Adapter]]:
    """{module path: {adapter path: adapter}}: the q/k/v slice adapters of c_attn share one module.

    >>> a = {"A": 0, "B": 0}
    >>> adapters_by_module({"h": {"0": {"attn": {"c_attn": {"q": a, "v": a}}}}})
    {'h.0.attn.c_attn': {'h.0.attn.c_attn.q': {'A': 0, 'B': 0}, 'h.0.attn.c_attn.v': {'A': 0, 'B': 0}}}
    """
    grouped: dict[str, dict[str, Adapter]] = {}
    for path, adapter in flatten_adapters(lora).items():
        grouped.setdefault(split_slice(path)[0], {})[path] = adapter
    return grouped


def split_slice(path: str) -> tuple[str, str | None]:
    """("h.0.attn.c_attn.q") -> ("h.0.attn.c_attn", "q"); a whole module gives (path, None)."""
    parent, _, last = path.rpartition(".")
    return (parent, last) if last in QKV else (path, None)


def output_columns(path: str, d_out: int) -> slice:
    """The columns of the module's (d_in, d_out) kernel that the adapter at `path` updates."""
    _, part = split_slice(path)
    if part is None:
        return slice(0, d_out)
    width = d_out // len(QKV)
    i = QKV.index(part)
    return slice(i * width, (i + 1) * width)


def adapted_shape(params: Mapping, path: str) -> tuple[int, int]:
    """(d_out, d_in) of the weight slice the adapter at `path` updates."""
    module, _ = split_slice(path)
    d_in, d_out = get_path(params, module)["kernel"].shape
    cols = output_columns(path, d_out)
    return cols.stop - cols.start, d_in


def _init_a(key: jax.Array, init: str, r: int, d_in: int, dtype) -> jax.Array:
    if init == "kaiming":  # torch's kaiming_uniform_(a=sqrt(5)) on (r, d_in): U(-1/sqrt(d_in), 1/sqrt(d_in))
        bound = 1.0 / math.sqrt(d_in)
        return jax.random.uniform(key, (r, d_in), dtype, -bound, bound)
    if init == "gaussian":  # PEFT's "gaussian": N(0, (1/r)^2)
        return jax.random.normal(key, (r, d_in), dtype) / r
    return jnp.zeros((r, d_in), dtype)


def as_lora_config(model_or_cfg: Any) -> LoraConfig:
    """The `LoraConfig` itself, or the one a model carries as ``model.lora``."""
    cfg = model_or_cfg if isinstance(model_or_cfg, LoraConfig) else model_or_cfg.lora
    if cfg is None:
        raise ValueError("the model has no LoraConfig: load it with load_gpt2(..., lora=LoraConfig(...))")
    return cfg


def init_lora(key: jax.Array, model_or_cfg: Any, params: Mapping, dtype=jnp.float32) -> dict:
    """A fresh LoRA tree for `params`: A random (per `cfg.init`), B = 0; with DoRA, m = ||W_j||.

    Args:
      key: PRNG key; each adapter gets ``fold_in(key, index)`` in path order.
      model_or_cfg: a `LoraConfig`, or a model carrying one as ``model.lora``.
      params: the base parameter tree (its kernels' shapes; with DoRA also their values).
      dtype: dtype of A and B (float32 also under bfloat16 compute).

    Returns:
      The LoRA tree; the model it adapts equals the base model exactly, since B = 0.

    Raises:
      ConfigError: `cfg.init` changes the base (PiSSA, OLoRA): use `init_adapters`.
    """
    cfg = as_lora_config(model_or_cfg)
    if cfg.changes_base:
        raise ConfigError(
            f"LoRA init {cfg.init!r} replaces the base weights by a residual: use "
            "jlora.init_adapters(key, cfg, params), which returns (residual params, lora)"
        )
    n_layer = len(params["h"])
    flat = {}
    for i, path in enumerate(cfg.module_paths(n_layer)):
        d_out, d_in = adapted_shape(params, path)
        r = cfg.rank_for(path)
        if r > min(d_in, d_out):  # rank(B A) <= min(d_in, d_out): the extra rank would only cost memory
            raise ConfigError(
                f"LoRA rank r={r} exceeds {path}'s width ({d_in} -> {d_out}); valid: r <= {min(d_in, d_out)}"
            )
        flat[path] = {
            "A": _init_a(jax.random.fold_in(key, i), cfg.init, r, d_in, dtype),
            "B": jnp.zeros((d_out, r), dtype),
        }
    return unflatten_adapters(with_magnitudes(flat, cfg, params) if cfg.use_dora else flat)


def with_magnitudes(flat: Mapping[str, Adapter], cfg: LoraConfig, params: Mapping) -> dict[str, Adapter]:
    """The adapters with DoRA's magnitude m = ||W_j + s (B A)_j|| added (``||W_j||`` when B = 0).

    As PEFT initialises it: the norm of the weight the adapter starts from, so W' = W at step 0.
    """
    out = {}
    for path, adapter in flat.items():
        kernel = get_path(params, path)["kernel"]  # DoRA adapts whole modules (no q/k/v slices)
        scaling = cfg.scaling_for(path, r=adapter["A"].shape[0])
        m = column_norm(kernel, adapter["A"], adapter["B"], scaling)
        out[path] = {**adapter, "m": m.astype(adapter["A"].dtype)}
    return out


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, scaling: float) -> jax.Array:
    """The LoRA path, scaling * B A x, for inputs in rows.

    Args:
      x: (..., d_in) input (after LoRA dropout).
      a: (r, d_in). b: (d_out, r). Both cast to x's dtype.
    Returns:
      (..., d_out). The scale multiplies the (..., r) intermediate, the cheapest place.
    """
    z = jnp.einsum("...i,ri->...r", x, a.astype(x.dtype)) * jnp.asarray(scaling, x.dtype)
    return jnp.einsum("...r,or->...o", z, b.astype(x.dtype))


def stacked_lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, weights: jax.Array) -> jax.Array:
    """Each row's mix of K adapters' updates, ``sum_k weights[n, k] * B_k A_k x_n`` (`jlora.core.algebra.mixed`).

    Args:
      x: (N, ..., d_in) input, rows first.
      a: (K, r, d_in). b: (K, d_out, r): K adapters stacked (zero-padded to one rank r).
      weights: (N, K), e.g. each row's adapter one-hot times that adapter's scaling.
    Returns:
      (N, ..., d_out). The K adapters act as one adapter of rank K * r whose (..., K, r) intermediate
      is weighted per row: two matmuls, no copy of any A or B per row.
    """
    z = jnp.einsum("n...i,kri->n...kr", x, a.astype(x.dtype))
    w = weights.astype(x.dtype).reshape(weights.shape[0], *[1] * (x.ndim - 2), weights.shape[1], 1)
    return jnp.einsum("n...kr,kor->n...o", z * w, b.astype(x.dtype))
