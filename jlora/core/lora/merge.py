"""Fold the LoRA update into the frozen weights, and take it out again.

GPT-2's kernels are stored (d_in, d_out) (Conv1D, ``x @ kernel``), while the maths and the
adapters use W (d_out, d_in). So the update lands in the kernel transposed::

    delta_w = scaling * B A                        (d_out, d_in)
    kernel[:, cols] += delta_w.T                   (d_in, d_out); cols = output_columns(path)

A DoRA adapter (`jlora.core.lora.dora`) also rescales each output feature, with n the norm of
the unmerged weight::

    kernel' = (kernel + delta_w.T) * (m / n)[None, :],   n_j = ||W_j + scaling (B A)_j||

which cannot be undone from the merged weights alone (n is lost), so `unmerge` refuses it.

A q/k/v slice adapter updates only its third of the fused c_attn kernel's columns. Each
kernel is taken to float32 once, receives every adapter that touches it, and is cast back to
its own dtype once (so bfloat16 weights are rounded a single time).

`merge` and `unmerge` are pure and jit-compatible; each adapter's scale is the one it carries
(`jlora.core.lora.adapter`). Called outside jit they refuse to return non-finite weights,
raising `ValueError` naming the module; inside a caller's jit the values are abstract and
that check cannot run, so merge outside jit (it compiles itself) when the check matters.

>>> import jax.numpy as jnp
>>> params = {"h": {"0": {"attn": {"c_attn": {"kernel": jnp.zeros((2, 6)), "bias": jnp.zeros(6)}}}}}
>>> lora = {"h": {"0": {"attn": {"c_attn": {"A": jnp.ones((1, 2)), "B": jnp.ones((6, 1)), "scaling": 2.0}}}}}
>>> merged = merge(params, lora)
>>> merged["h"]["0"]["attn"]["c_attn"]["kernel"]
Array([[2., 2., 2., 2., 2., 2.],
       [2., 2., 2., 2., 2., 2.]], dtype=float32)
>>> float(abs(unmerge(merged, lora)["h"]["0"]["attn"]["c_attn"]["kernel"]).max())
0.0
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jlora.core.lora.adapter import SCALE, adapters_by_module, factors, output_columns, scaling_of
from jlora.core.lora.dora import magnitude_scale
from jlora.tree import get_path, has_path, replace_paths

PyTree = Any
HIGHEST = jax.lax.Precision.HIGHEST  # a merge is done once: no reduced-precision matmul passes


def delta_w(a: jax.Array, b: jax.Array, scaling: float) -> jax.Array:
    """The dense update scaling * B A, (d_out, d_in) in float32.

    Args:
      a: (r, d_in). b: (d_out, r).
    """
    return scaling * jnp.matmul(b.astype(jnp.float32), a.astype(jnp.float32), precision=HIGHEST)


def _check_shapes(path: str, kernel: jax.Array, adapter: Mapping) -> None:
    d_in, d_out = kernel.shape
    cols = output_columns(path, d_out)
    a, b = adapter["A"], adapter["B"]
    want_a, want_b = (a.shape[0], d_in), (cols.stop - cols.start, a.shape[0])
    m = adapter.get("m")
    if a.shape != want_a or b.shape != want_b or (m is not None and m.shape != want_b[:1]):
        raise ValueError(
            f"adapter {path} does not fit its weight: A {a.shape}, B {b.shape}"
            + ("" if m is None else f", m {m.shape}")
            + f"; the kernel {tuple(kernel.shape)} needs A {want_a}, B {want_b}"
            + ("" if m is None else f", m {want_b[:1]}")
        )


def _new_kernels(
    kernels: dict[str, jax.Array], grouped: dict[str, dict], sign: float
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """{module: kernel} -> ({module: kernel +- its adapters' updates}, {module: all finite?})."""
    new, finite = {}, {}
    for module, adapters in grouped.items():
        kernel = kernels[module]
        acc = kernel.astype(jnp.float32)
        for path, adapter in adapters.items():
            scaling = adapter[SCALE]
            cols = output_columns(path, kernel.shape[1])
            update = sign * delta_w(*factors(adapter), scaling).T
            if "m" in adapter:  # DoRA: m / n from the weight before the update
                acc = acc.at[:, cols].set((acc[:, cols] + update) * magnitude_scale(acc[:, cols], adapter, scaling))
            else:
                acc = acc.at[:, cols].add(update)
        new[module] = acc.astype(kernel.dtype)
        finite[module] = jnp.all(jnp.isfinite(new[module]))
    return new, finite


# Only the adapted kernels go through jit: every other leaf is passed back as the same array.
_new_kernels_jit = jax.jit(_new_kernels, static_argnums=2)


def check_fits(params: Mapping, lora: Mapping) -> None:
    """ValueError unless every adapter of `lora` fits its kernel in `params` (arrays, or only their shapes:
    ``jax.eval_shape``'s or a family's ``param_shapes``); the message names the module and both shapes."""
    grouped = adapters_by_module(lora)
    missing = [module for module in grouped if not has_path(params, module + ".kernel")]
    if missing:
        raise ValueError(f"the LoRA tree adapts {missing}, which have no kernel in params")
    for module, adapters in grouped.items():
        for path, adapter in adapters.items():
            _check_shapes(path, get_path(params, module)["kernel"], adapter)


def _apply(params: Mapping, lora: Mapping, sign: float, verb: str) -> PyTree:
    grouped = adapters_by_module(lora)
    check_fits(params, lora)
    if sign < 0 and any("m" in a for adapters in grouped.values() for a in adapters.values()):
        raise ValueError(
            "unmerge cannot undo a DoRA merge: the norm ||W + scaling B A|| it divided by is not in the merged "
            "weights; keep the base parameters instead"
        )
    kernels = {module: get_path(params, module)["kernel"] for module in grouped}
    for adapters in grouped.values():
        for path, adapter in adapters.items():
            scaling_of(adapter, path)
    new, finite = _new_kernels_jit(kernels, grouped, sign)
    if not any(isinstance(f, jax.core.Tracer) for f in finite.values()):  # under the caller's jit: abstract
        bad = [module for module, ok in finite.items() if not bool(ok)]
        if bad:
            raise ValueError(
                f"{verb} would write non-finite values (inf/nan) into {', '.join(bad)}; "
                "check the adapters' A and B (and the scaling) of these modules"
            )
    return replace_paths(params, {f"{module}.kernel": kernel for module, kernel in new.items()})


def merge(params: Mapping, lora: Mapping) -> PyTree:
    """The base parameters with every adapter's update folded in: W' = W + scaling * B A (DoRA: see the module doc).

    Args:
      params: the base tree; kernels (d_in, d_out) in any float dtype.
      lora: the adapters, ``{"A": (r, d_in), "B": (d_out_slice, r), "scaling": ()[, "m": (d_out,)]}`` per module.

    Returns:
      A new tree of the same structure and dtypes; only adapted kernels differ, so
      ``model.apply({"params": merge(params, lora)}, ids)`` is the adapted model.

    Raises:
      ValueError: an adapter does not fit its weight, or (outside jit) a merged kernel
        would hold inf or nan; the message names the module.
    """
    return _apply(params, lora, 1.0, "merge")


def unmerge(params: Mapping, lora: Mapping) -> PyTree:
    """The inverse of `merge`: W = W' - scaling * B A (exact up to the weights' rounding); not for DoRA."""
    return _apply(params, lora, -1.0, "unmerge")
