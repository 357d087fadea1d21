"""How many parameters an adapter trains, and how few that is beside the weight it adapts.

An adapter on a weight W (d_out x d_in) has ``A: (r, d_in)`` and ``B: (d_out, r)``, so
``r * (d_in + d_out)`` parameters against W's ``d_in * d_out``::

    GPT-2 c_attn (768 -> 2304), r = 8:   A 6,144 + B 18,432 = 24,576 per layer
    a 768 x 768 weight, r = 8:           12,288 of 589,824 = 2.08 %

>>> adapter_param_count(768, 2304, 8)
24576
>>> f"{adapter_compression(768, 768, 8):.2%}"
'2.08%'

A DoRA adapter also trains its magnitude ``m: (d_out,)``, counted as "m" and in "lora" (as PEFT's
``print_trainable_parameters`` counts ``lora_magnitude_vector``): ``r * (d_in + d_out) + d_out``.

Counts read only shapes, so they work on `jax.ShapeDtypeStruct` trees from `jax.eval_shape`
(GPT-2 small without allocating it: ``jlora.core.models.gpt2.param_shapes(GPT2Config())``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from jlora.core.lora.adapter import SCALE, adapted_shape, flatten_adapters


def adapter_param_count(d_in: int, d_out: int, r: int) -> int:
    """Parameters of one rank-`r` adapter on a (d_out x d_in) weight: r * (d_in + d_out)."""
    return r * (d_in + d_out)


def adapter_compression(d_in: int, d_out: int, r: int) -> float:
    """The adapter's parameters as a fraction of the weight's: r (d_in + d_out) / (d_in d_out)."""
    return adapter_param_count(d_in, d_out, r) / (d_in * d_out)


def _size(x) -> int:
    return math.prod(x.shape)


def module_counts(lora: Mapping, params: Mapping | None = None) -> dict[str, dict[str, int | float]]:
    """Per adapted module: {"A", "B"[, "m"], "lora"} parameter counts, and with `params` the adapted
    weight's size ("weight": d_out x d_in of the columns it updates) and "ratio" = lora / weight.

    >>> import jax
    >>> a = jax.ShapeDtypeStruct((8, 768), "float32"); b = jax.ShapeDtypeStruct((2304, 8), "float32")
    >>> module_counts({"h": {"0": {"attn": {"c_attn": {"A": a, "B": b}}}}})
    {'h.0.attn.c_attn': {'A': 6144, 'B': 18432, 'lora': 24576}}
    """
    table: dict[str, dict[str, int | float]] = {}
    for path, adapter in flatten_adapters(lora).items():
        row: dict[str, int | float] = {n: _size(leaf) for n, leaf in adapter.items() if n != SCALE}  # A, B (, m)
        row["lora"] = sum(row.values())
        if params is not None:
            d_out, d_in = adapted_shape(params, path)
            row["weight"] = d_out * d_in
            row["ratio"] = row["lora"] / row["weight"]
        table[path] = row
    return table


def lora_param_count(lora: Mapping) -> int:
    """All trainable LoRA parameters in a LoRA tree (what PEFT's print_trainable_parameters reports)."""
    return sum(row["lora"] for row in module_counts(lora).values())


def compression_ratio(lora: Mapping, params: Mapping) -> float:
    """LoRA parameters / parameters of the weights (or weight slices) they adapt."""
    rows = module_counts(lora, params).values()
    return sum(row["lora"] for row in rows) / sum(row["weight"] for row in rows)
