"""The adapter: a value that carries its factors and its scale, its layout, its initialisation and its update.

The model's variables are two separate pytrees::

    {"params": base,   # the checkpoint's tree, frozen
     "lora":   lora}   # the adapters: factors trained, each its own scale

`lora` mirrors `params`: the adapter of the weight ``params["h"]["0"]["attn"]["c_attn"]
["kernel"]`` (stored (d_in, d_out), as GPT-2's Conv1D) lives at ``lora["h"]["0"]["attn"]["c_attn"]``::

    {"A": (r, d_in), "B": (d_out, r), "scaling": ()}       h += scaling * B A x

in the maths' (and PEFT's) layout. The scale is set once, when the adapter is built (`init_lora`,
or `with_scaling` for factors read from a file: alpha / r, rsLoRA's alpha / sqrt(r), the patterns),
and everything after reads it from the adapter: the forward pass, merging, the spectrum,
combining, export. It is a leaf like the factors, so a population's adapters stacked along a
member axis carry their scales stacked too, ``"scaling": (K,)``, and a mixed batch's rows each
their own weights, ``"scaling": (N, K)``; the trainable mask leaves it frozen.

A slice adapter of a fused projection (GPT-2's q, k, v thirds of c_attn) sits one level down,
``lora[...]["c_attn"]["q"] = {"A": (r, D), "B": (D, r), "scaling": ()}``. So one path names a
module everywhere, and `flatten_adapters` gives ``{"h.0.attn.c_attn": {"A": ..., "B": ..., "scaling": ...}}``.
An adapter may hold more, and every function here carries its other leaves along: DoRA's
magnitude ``"m": (d_out,)`` (`jlora.core.lora.dora`) sits beside them, and AdaLoRA's singular values
``"E": (r,)`` (`jlora.core.lora.adalora`), which make the update ``scaling * B diag(E) A`` (`factors`).

`init_lora` makes the adapters whose B starts at 0 (the base is untouched); PiSSA and
OLoRA start from the weight itself and change the base, so `jlora.core.lora.residual.init_adapters`
makes those (with the residual base).

>>> import jax, jax.numpy as jnp
>>> params = {"h": {"0": {"attn": {"c_attn": {"kernel": jnp.zeros((4, 12))}}}}}
>>> lora = init_lora(jax.random.key(0), LoraConfig(r=2, alpha=4), params)
>>> {p: (a["A"].shape, a["B"].shape, float(a["scaling"])) for p, a in flatten_adapters(lora).items()}
{'h.0.attn.c_attn': ((2, 4), (12, 2), 2.0)}
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
from jlora.tree import get_path, path_names, unflatten

PyTree = Any
Adapter = dict  # {"A": (r, d_in), "B": (d_out, r), "scaling": ()[, "m": (d_out,) for DoRA]}
SCALE = "scaling"  # the adapter's leaf holding its scale: set when it is built, never trained


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


def factors(adapter: Mapping) -> tuple[jax.Array, jax.Array]:
    """(A, B) of the update ``scaling * B A``: an SVD-shaped adapter's (AdaLoRA's, `jlora.core.lora.adalora`)
    A is diag(E) A.

    >>> adapter = {"A": jnp.ones((2, 3)), "E": jnp.asarray([2.0, 0.0]), "B": jnp.ones((4, 2))}
    >>> factors(adapter)[0].tolist()
    [[2.0, 2.0, 2.0], [0.0, 0.0, 0.0]]
    """
    if "E" in adapter:
        return adapter["A"] * adapter["E"][..., None].astype(adapter["A"].dtype), adapter["B"]
    return adapter["A"], adapter["B"]


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
    if cfg.init == "eva":
        raise ConfigError(
            "LoRA init 'eva' takes A from the inputs of the training data: jlora.core.update.probes.eva_adapters"
            "(model, params, cfg, batches) makes the adapters (a run does it before step 0)"
        )
    if cfg.changes_base:
        raise ConfigError(
            f"LoRA init {cfg.init!r} replaces the base weights by a residual: use "
            "jlora.init_adapters(key, cfg, params), which returns (residual params, lora)"
        )
    flat = {}
    for i, path in enumerate(cfg.module_paths(params)):
        d_out, d_in = adapted_shape(params, path)
        r = cfg.rank_for(path)
        if r > min(d_in, d_out):  # rank(B A) <= min(d_in, d_out): the extra rank would only cost memory
            raise ConfigError(
                f"LoRA rank r={r} exceeds {path}'s width ({d_in} -> {d_out}); valid: r <= {min(d_in, d_out)}"
            )
        if cfg.init == "adalora":  # PEFT's AdaLoRA: A, B ~ N(0, 0.02), E = 0
            a_key, b_key = jax.random.split(jax.random.fold_in(key, i))
            flat[path] = {
                "A": 0.02 * jax.random.normal(a_key, (r, d_in), dtype),
                "E": jnp.zeros((r,), dtype),
                "B": 0.02 * jax.random.normal(b_key, (d_out, r), dtype),
            }
            continue
        flat[path] = {
            "A": _init_a(jax.random.fold_in(key, i), cfg.init, r, d_in, dtype),
            "B": jnp.zeros((d_out, r), dtype),
        }
    flat = with_scaling(flat, cfg, flat=True)
    return unflatten_adapters(with_magnitudes(flat, params) if cfg.use_dora else flat)


def with_magnitudes(flat: Mapping[str, Adapter], params: Mapping) -> dict[str, Adapter]:
    """The adapters with DoRA's magnitude m = ||W_j + s (B A)_j|| added (``||W_j||`` when B = 0).

    As PEFT initialises it: the norm of the weight the adapter starts from, so W' = W at step 0.
    """
    out = {}
    for path, adapter in flat.items():
        kernel = get_path(params, path)["kernel"]  # DoRA adapts whole modules (no q/k/v slices)
        m = column_norm(kernel, adapter["A"], adapter["B"], scaling_of(adapter, path))
        out[path] = {**adapter, "m": m.astype(adapter["A"].dtype)}
    return out


def with_scaling(lora: Mapping, cfg: LoraConfig, *, flat: bool = False) -> dict:
    """`lora` with each adapter's scale set as `cfg` gives it for its path and rank: building an adapter
    from factors (read from a checkpoint or a PEFT folder, or just made). A scale already there is replaced.

    `flat`: `lora` is ``{path: adapter}`` (`flatten_adapters`' form), and so is the result.

    >>> import jax.numpy as jnp
    >>> lora = {"h": {"0": {"attn": {"c_attn": {"A": jnp.ones((4, 3)), "B": jnp.zeros((9, 4))}}}}}
    >>> float(with_scaling(lora, LoraConfig(r=4, alpha=16))["h"]["0"]["attn"]["c_attn"]["scaling"])
    4.0
    """
    adapters = dict(lora) if flat else flatten_adapters(lora)
    scaled = {
        path: {**adapter, SCALE: jnp.asarray(cfg.scaling_for(path, r=adapter["A"].shape[-2]), jnp.float32)}
        for path, adapter in adapters.items()
    }
    return scaled if flat else unflatten_adapters(scaled)


def map_factors(fn, lora: Mapping) -> dict:
    """`lora` with `fn` applied to every factor leaf (A, B, DoRA's m), each scale kept as it is.

    >>> lora = {"c_fc": {"A": jnp.ones((1, 2)), "B": jnp.ones((3, 1)), "scaling": jnp.asarray(2.0)}}
    >>> jax.tree.map(float, map_factors(lambda x: 3 * x.sum(), lora))
    {'c_fc': {'A': 6.0, 'B': 9.0, 'scaling': 2.0}}
    """
    return jax.tree_util.tree_map_with_path(lambda kp, x: x if path_names(kp)[-1] == SCALE else fn(x), lora)


def without_scaling(lora: Mapping) -> dict:
    """The factors alone (A, B, and DoRA's m): what is trained, saved and exported as tensors."""
    return unflatten_adapters(
        {path: {k: v for k, v in a.items() if k != SCALE} for path, a in flatten_adapters(lora).items()}
    )


def scaling_of(adapter: Mapping, path: str = "") -> jax.Array:
    """The scale an adapter carries; a ValueError naming `path` if it was made without one."""
    if SCALE not in adapter:
        where = f" at {path}" if path else ""
        raise ValueError(
            f"the adapter{where} carries no scale: build it with jlora.init_lora, or give factors their scale "
            "with jlora.with_scaling(lora, cfg)"
        )
    return adapter[SCALE]


def adapter_delta(x: jax.Array, adapter: Mapping, path: str = "") -> jax.Array:
    """The adapter's update of inputs in rows, with the scale it carries: ``scaling * B A x``.

    One adapter (A (r, d_in)) gives `lora_delta`; K adapters stacked (A (K, r, d_in), as a mixed
    batch hands them to a layer) give each row its own mix, the scale then per row and adapter
    (``"scaling": (N, K)``, `stacked_lora_delta`).
    """
    scale = scaling_of(adapter, path)
    a, b = factors(adapter)
    if a.ndim == 3:
        if jnp.ndim(scale) != 2:
            raise ValueError(
                f"stacked adapters{' at ' + path if path else ''} need per-row weights: "
                "use jlora.core.algebra.mixed.mixed_variables"
            )
        return stacked_lora_delta(x, a, b, scale)
    return lora_delta(x, a, b, scale)


def module_delta(x: jax.Array, node: Mapping, d_out: int, path: str = "") -> jax.Array:
    """The update of one module, (..., d_out): its adapter's, or its slice adapters' side by side.

    `node` is the "lora" collection at the module: an adapter (with "A"), or ``{"q": adapter, "v": ...}``
    for slices of a fused projection (`QKV` order; a slice without an adapter adds zeros).
    """
    if "A" in node:
        return adapter_delta(x, node, path)
    width = d_out // len(QKV)
    parts = [
        adapter_delta(x, node[s], f"{path}.{s}") if s in node else jnp.zeros((*x.shape[:-1], width), x.dtype)
        for s in QKV
    ]
    return jnp.concatenate(parts, axis=-1)


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

    A row's result depends on its own adapters only (those of non-zero weight), whatever the others hold:
    their part of the intermediate is selected away, not multiplied by zero (0 x NaN is NaN), and a
    non-finite entry of another adapter's B, which the second matmul would spread to every row, is
    read as 0 there and as NaN in the rows of its own adapter.
    """
    z = jnp.einsum("n...i,kri->n...kr", x, a.astype(x.dtype))
    w = weights.astype(x.dtype).reshape(weights.shape[0], *[1] * (x.ndim - 2), weights.shape[1], 1)
    used = w != 0  # (N, ..., K, 1): which adapters each row reads
    b = b.astype(x.dtype)
    finite = jnp.isfinite(b)
    out = jnp.einsum("n...kr,kor->n...o", jnp.where(used, z * w, 0), jnp.where(finite, b, 0))
    poisoned = jnp.any(used[..., 0] & ~jnp.all(finite, axis=(1, 2)), axis=-1, keepdims=True)  # (N, ..., 1)
    return jnp.where(poisoned, jnp.nan, out)
