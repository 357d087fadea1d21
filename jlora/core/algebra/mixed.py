"""Mixed-adapter batches: K adapters over one base, each row of a batch answered by its own.

PEFT serves a batch whose rows name different adapters (``adapter_names=`` per row); here the
K adapters are one stacked value and the row's adapter an index, both arguments of the compiled
function, so another set of K adapters of the same shapes runs without a new compilation::

    stack    lora     {"A": (K, R, d_in), "B": (K, d_out, R), "scaling": (K,)} per adapter path; R the
                      largest rank there, the others zero-padded (as a population's,
                      `jlora.core.update.population`), zeros for an adapter that lacks the module; each
                      adapter's own scale (0 where it lacks one)
    index    (N,) int: row n is answered by adapter index[n]; -1 by the base alone (PEFT's "__base__")

    mixed_variables(params, stack, index) =
        {"params": params, "lora": stack.lora with each "scaling": (N, K) = onehot(index) * scaling}

The models' `Linear`, given stacked A and B, adds ``sum_k weights[n, k] B_k A_k x_n`` to row n
(`jlora.core.lora.stacked_lora_delta`): the K adapters act as one adapter of rank K * R whose
intermediate is weighted per row, so the base runs once per row and the batch is two extra
matmuls per module. No per-row copy of A and B is made: gathering ``A[index]`` would read
N R (d_in + d_out) numbers per decoded token where the stack reads K R (d_in + d_out). The price
is K times the LoRA path's arithmetic, small while K R is small against d_in d_out / (d_in + d_out)
(576 for GPT-2 small's c_attn); a row's result differs from the single adapter's by float rounding.

`make_mixed_eval_step` scores such a batch and gives each adapter's loss sums over its own rows;
`jlora.core.decoding.generate.generate` decodes one (``adapters=stack, adapter_index=...``).

>>> import jax, jax.numpy as jnp, jlora
>>> config = jlora.GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2)
>>> params = jlora.init_params(jax.random.key(0), config)
>>> cfgs = [jlora.LoraConfig(r=2, alpha=4), jlora.LoraConfig(r=4, alpha=4)]
>>> stack = stack_adapters([jlora.init_lora(jax.random.key(k), c, params) for k, c in enumerate(cfgs)])
>>> jax.tree.map(jnp.shape, stack.lora["h"]["0"]["attn"]["c_attn"]), stack.lora["h"]["0"]["attn"]["c_attn"]["scaling"]
({'A': (2, 4, 8), 'B': (2, 24, 4), 'scaling': (2,)}, Array([2., 1.], dtype=float32))
>>> variables = mixed_variables(params, stack, jnp.array([1, 0, -1]))   # rows 0, 1, 2: adapter 1, 0, the base
>>> variables["lora"]["h"]["0"]["attn"]["c_attn"]["scaling"].tolist()
[[0.0, 1.0], [2.0, 0.0], [0.0, 0.0]]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core.algebra.combine import Adapters, adapters_by_path
from jlora.core.lora.adapter import SCALE, flatten_adapters, unflatten_adapters
from jlora.core.update.loss import CHUNK, at_loss_positions, head_loss_sum, hidden_states
from jlora.core.update.mesh import Placement, mesh_placement
from jlora.core.update.step import EvalStep, compile_eval
from jlora.errors import ConfigError


class AdapterStack(NamedTuple):
    """K adapters stacked for one base: `lora`, (K, ...) per adapter path, each scale (K,) beside its factors."""

    lora: dict

    @property
    def size(self) -> int:
        return int(next(iter(flatten_adapters(self.lora).values()))[SCALE].shape[0])

    def variables(self, params: Mapping) -> dict:
        """``{"params": params, "lora": (K, ...)}``: what `make_mixed_eval_step` reads."""
        return {"params": params, "lora": self.lora}


def stack_adapters(adapters: Adapters) -> AdapterStack:
    """The `AdapterStack` of K adapter trees (each adapter with its scale); ranks, scales and modules may differ.

    Raises CheckpointError for adapters that cannot share a base (DoRA, factors of other shapes,
    a fused module in one and its slices in another, as `jlora.core.algebra.combine.adapters_by_path`).
    """
    by_path = adapters_by_path(adapters)
    k = len(adapters)
    lora = {}
    for path, present in by_path.items():
        rank = max(adapter["A"].shape[0] for _, adapter, _ in present)
        (_, first, _), d_out = present[0], present[0][1]["B"].shape[0]
        a = np.zeros((k, rank, first["A"].shape[1]), np.float32)
        b = np.zeros((k, d_out, rank), np.float32)
        s = np.zeros(k, np.float32)
        for i, adapter, scale in present:
            r = adapter["A"].shape[0]
            a[i, :r], b[i, :, :r], s[i] = np.asarray(adapter["A"]), np.asarray(adapter["B"]), scale
        lora[path] = {"A": jnp.asarray(a), "B": jnp.asarray(b), SCALE: jnp.asarray(s)}
    return AdapterStack(unflatten_adapters(lora))


def check_index(index: Sequence[int] | np.ndarray, size: int, rows: int | None = None) -> np.ndarray:
    """`index` as (N,) int32 if every entry names an adapter of the stack (or -1, the base); else ConfigError.

    Under jit an index cannot be checked (an out-of-range one would silently give the base model), so
    callers check it here first. `rows`: the number of rows it must have.
    """
    index = np.asarray(index)
    if index.ndim != 1 or (rows is not None and index.shape[0] != rows) or not np.issubdtype(index.dtype, np.integer):
        raise ConfigError(
            f"adapter_index must be {rows if rows is not None else 'N'} integers, one per row; got {index!r}"
        )
    bad = index[(index < -1) | (index >= size)]
    if bad.size:
        raise ConfigError(
            f"adapter index {int(bad[0])} is outside the stack of {size} adapters; "
            f"valid: 0..{size - 1}, or -1 for the base"
        )
    return index.astype(np.int32)


def mixed_variables(params: Mapping, stack: AdapterStack, index: jax.Array) -> dict:
    """The model's variables for a batch whose row n is answered by adapter ``index[n]`` (-1: the base).

    Traceable: inside a compiled function the stack and the index stay arguments.
    """
    picked = index[:, None] == jnp.arange(stack.size)  # (N, K); -1 picks none
    # selected, not multiplied: a row's weights are its own adapter's scale and zeros, whatever the others' scales
    rows = {
        path: {**a, SCALE: jnp.where(picked, a[SCALE][None, :], 0.0)}
        for path, a in flatten_adapters(stack.lora).items()
    }
    return {"params": params, "lora": unflatten_adapters(rows)}


def mixed_loss_sums(model, variables: Mapping, batch: Mapping, *, chunk: int = CHUNK) -> tuple[jax.Array, jax.Array]:
    """(loss sums (K,), token counts (K,)): each adapter's masked loss over the rows it answers.

    Args:
      model: a `GPT2` with a LoraConfig (its dropout is not used; the stack gives the scalings).
      variables: `AdapterStack.variables`, ``{"params", "lora": (K, ...)}``.
      batch: a (shaped) batch, `jlora.core.update.loss`'s keys, plus ``adapter_index`` (R,) int.
    """
    stack = AdapterStack(variables["lora"])
    index = batch["adapter_index"]
    hidden = hidden_states(model, mixed_variables(variables["params"], stack, index), batch)
    mask = batch["loss_mask"].astype(jnp.float32)
    rows = jax.nn.one_hot(index, stack.size, dtype=jnp.float32)  # (R, K)
    weights = at_loss_positions(mask[..., None] * rows[:, None, :], batch)  # (R * positions, K)
    targets = jnp.where(weights.sum(axis=1) > 0, at_loss_positions(batch["targets"], batch), 0)
    wte, h = model.head_weight(variables["params"]), at_loss_positions(hidden, batch)
    # vmapped over the adapters' weights only: the head's logits are computed once for all K
    sums = jax.vmap(lambda w: head_loss_sum(h, wte, targets, w, chunk), in_axes=1)(weights)
    return sums, (mask.sum(axis=1)[:, None] * rows).sum(axis=0)


def make_mixed_eval_step(
    model, *, n_devices: int | None = None, fsdp: int = 1, placement: Placement | None = None
) -> EvalStep:
    """``eval_step(stack.variables(params), batch) -> (loss sums (K,), token counts (K,))`` of a mixed batch.

    jit over a device mesh, as `jlora.core.update.step.make_eval_step` (the rows split over the devices,
    every adapter on each); the stack is an argument, so any stack of the same shapes reuses the compiled
    step. The batch carries ``adapter_index`` (R,), checked first with `check_index`.
    """
    if placement is None:
        placement = mesh_placement(1, fsdp=fsdp, devices=n_devices)
    return compile_eval(lambda variables, batch: mixed_loss_sums(model, variables, batch), placement)
