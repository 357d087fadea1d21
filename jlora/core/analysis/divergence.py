"""How far an adapted model's predictions moved from its base's: KL divergence, and forgetting.

Forgetting is measured on held-out text from outside the task: on its masked tokens, the
adapted model's loss beside the base model's, and the mean per-token KL(base || adapted)::

    forgetting_sums(model, {"params", "lora"}, {"params": base}, batch)
        -> (adapted loss sum, base loss sum, KL sum, token count)

Sums, as `jlora.core.update.loss.loss_sums` returns, so that batches and devices add up before one
division. KL(base || adapted) is the expected extra surprise of the adapted model on text the
base would write: 0 when the two agree, whatever the losses are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jlora.core.update.loss import token_losses

PyTree = Any


def kl_divergence(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
    """KL(p || q) at each position, (..., V) -> (...), in float32.

    Written through the logit difference d = p - q, as ``E_p[d] - log E_q[exp d]``: when the
    two nearly agree the divergence is O(d^2) while each log-probability is O(log V), and
    subtracting those would lose it to rounding.

    >>> t = jnp.array([[0.0, 1.0, 2.0]]); s = jnp.array([[0.0, 1.0, 2.5]])
    >>> p, q = jax.nn.softmax(t), jax.nn.softmax(s)
    >>> bool(jnp.allclose(kl_divergence(t, s), jnp.sum(p * jnp.log(p / q), -1), rtol=1e-5))
    True
    """
    t, s = p_logits.astype(jnp.float32), q_logits.astype(jnp.float32)
    d = t - s
    expected = jnp.sum(jax.nn.softmax(t, axis=-1) * d, axis=-1)
    q = jax.nn.softmax(s, axis=-1)
    near = jnp.max(jnp.abs(d), axis=-1) < 20.0  # expm1 is safe; beyond that use the plain form
    log_ratio = jnp.where(
        near,
        jnp.log1p(jnp.sum(q * jnp.expm1(jnp.where(near[..., None], d, 0.0)), axis=-1)),
        jax.nn.logsumexp(jax.nn.log_softmax(s, axis=-1) + d, axis=-1),
    )
    return expected - log_ratio


def forgetting_sums(
    model, variables: PyTree, base_variables: PyTree, batch: Mapping[str, jax.Array]
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(adapted loss sum, base loss sum, KL(base || adapted) sum, token count) over the masked tokens.

    Args:
      model: a `jlora.GPT2`.
      variables: the adapted model's ``{"params", "lora"[, "lora_scaling"]}``.
      base_variables: the base model's ``{"params": base}`` (its own trained leaves, if any, not applied).
      batch: ``input_ids``, ``targets``, ``loss_mask``, each (B, T). Deterministic (no dropout).
    """
    adapted = model.apply(variables, batch["input_ids"])
    base = model.apply(base_variables, batch["input_ids"])
    mask = batch["loss_mask"].astype(jnp.float32)
    targets = jnp.where(mask > 0, batch["targets"], 0)
    total = lambda x: jnp.sum(x * mask)  # noqa: E731
    kl = kl_divergence(base, adapted)
    return total(token_losses(adapted, targets)), total(token_losses(base, targets)), total(kl), jnp.sum(mask)
