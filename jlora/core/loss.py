"""The training objective: next-token cross-entropy over the tokens the loss mask selects.

A batch is a dict of (B, T) arrays, right-padded::

    input_ids  int32    the tokens the model reads
    targets    int32    the next token at each position
    loss_mask  float32  1 where the target counts (answer and end-of-text tokens), else 0

The loss of a batch is ``sum(mask * ce) / sum(mask)``. Functions here return the two sums
separately, so that micro-batches and devices can be added up first and divided once by the
global token count; the mean over a global batch then does not depend on how it was split.

The attention mask is not passed to the model: with right padding and causal attention no real
token attends to a pad, and leaving it out keeps the fused attention kernel eligible on GPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Cross-entropy of each position, logsumexp(logits) - logits[target], in float32.

    Args:
      logits: (..., V) in any float dtype; the reductions run in float32 (XLA fuses the cast
        into them, so no float32 copy of a bfloat16 logits tensor need be kept).
      targets: (...) int token ids in [0, V).
    Returns:
      (...) float32.
    """
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def loss_sums(
    model,
    variables: PyTree,
    batch: Mapping[str, jax.Array],
    rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(sum of masked token losses, number of masked tokens) of a batch, both float32 scalars.

    Args:
      model: a `jlora.GPT2`.
      variables: ``{"params": base, "lora": adapters}`` (or the base alone).
      batch: ``input_ids``, ``targets``, ``loss_mask``, each (B, T).
      rng: a dropout key to train with dropout, or None for the deterministic model.
    """
    deterministic = rng is None
    rngs = None if deterministic else {"dropout": rng}
    logits = model.apply(variables, batch["input_ids"], deterministic=deterministic, rngs=rngs)
    mask = batch["loss_mask"].astype(jnp.float32)
    targets = jnp.where(mask > 0, batch["targets"], 0)  # a pad target may be out of range (-100, say)
    losses = token_losses(logits, targets)
    return jnp.sum(losses * mask), jnp.sum(mask)
