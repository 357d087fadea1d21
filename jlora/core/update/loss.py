"""The training objective: next-token cross-entropy over the tokens the loss mask selects.

A batch is a dict of (R, L) arrays, right-padded::

    input_ids     int32    the tokens the model reads
    targets       int32    the next token at each position
    loss_mask     float32  1 where the target counts (answer and end-of-text tokens), else 0
    loss_index    int32    (R, K), optional: the positions of each row that carry loss, then
                           positions that carry none (`jlora.training.data.batching`); without it
                           every position is a candidate
    segment_ids, position_ids   (R, L), optional: rows packed into one sequence (`GPT2.hidden`)

The loss of a batch is ``sum(mask * ce) / sum(mask)``. Functions here return the two sums
separately, so that micro-batches and devices can be added up first and divided once by the
global token count; the mean over a global batch then does not depend on how it was split.

The LM head runs only where the loss is. The final hidden states are gathered at ``loss_index``
(R*K positions instead of R*L), and `head_loss_sum` applies the tied head and the cross-entropy
a chunk of positions at a time, so the (positions x V) logits never exist whole::

    hidden (R, L, D) ─gather loss_index─> h (N, D) ─per chunk of C: logits (C, V) f32─> Σ w (lse - logit[t])
                                                    └─ and, when differentiated, dh = w (softmax - onehot) wte

Its gradient is computed in the forward pass, chunk by chunk, while the chunk's logits are at
hand (a custom VJP, as fused linear-cross-entropy kernels do): the backward pass only scales the
stored dh (N, D), so no logits are kept or recomputed and the head costs two matmuls, as it does
unchunked. ``wte``'s own gradient is formed only when ``wte`` trains.

Label smoothing (``OptimConfig.label_smoothing`` = eps, training only) is PyTorch's: each position's loss is
``(1 - eps) CE + eps mean_v(lse - logit_v)``, and its gradient ``w (softmax - (1 - eps) onehot - eps / V)``, both
from the chunk's logits already at hand, so the head stays two matmuls; eps = 0 is the unsmoothed program.

The attention mask is not passed to the model: with right padding and causal attention no real
token attends to a pad, and leaving it out keeps the fused attention kernel eligible on GPU.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any
CHUNK = 256  # positions per head chunk: (256, 50257) float32 logits are 51 MB


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Cross-entropy of each position, logsumexp(logits) - logits[target], in float32.

    Args:
      logits: (..., V) in any float dtype; the reductions run in float32.
      targets: (...) int token ids in [0, V).
    Returns:
      (...) float32.
    """
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def _logits(h: jax.Array, wte: jax.Array) -> jax.Array:
    """(C, D) @ wte (V, D) read in its own layout -> (C, V) float32, in h's (compute) dtype."""
    return jax.lax.dot_general(h, wte.astype(h.dtype), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _chunked(chunk: int, *arrays: jax.Array) -> tuple[jax.Array, ...]:
    """Each (N, ...) array zero-padded to a multiple of `chunk` rows and split: (N / chunk, chunk, ...)."""
    n = arrays[0].shape[0]
    size = min(chunk, n)
    pad = -n % size
    return tuple(jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape(-1, size, *a.shape[1:]) for a in arrays)


def _smoothed(losses, logits, lse, label_smoothing: float):
    """PyTorch's label smoothing of cross-entropies `losses` (C,): (1 - eps) CE + eps mean_v(-log p_v), where
    -log p_v = lse - logit_v. eps = 0 returns `losses` itself (a static branch: the same program as without)."""
    if not label_smoothing:
        return losses
    uniform = lse - jnp.mean(logits, axis=-1)  # mean over the vocabulary of -log p_v
    return (1 - label_smoothing) * losses + label_smoothing * uniform


def _chunk_losses(h, wte, targets, label_smoothing: float = 0.0):
    """(logits (C, V) float32, their logsumexp (C,), unweighted losses (C,)) of one chunk."""
    logits = _logits(h, wte)
    lse = jax.nn.logsumexp(logits, axis=-1)
    losses = lse - jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return logits, lse, _smoothed(losses, logits, lse, label_smoothing)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def head_loss_sum(
    h: jax.Array,
    wte: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    chunk: int = CHUNK,
    label_smoothing: float = 0.0,
):
    """Σ_n weights[n] * CE(h[n] @ wte.T, targets[n]) in float32, `chunk` positions at a time.

    Args:
      h: (N, D) final hidden states in the compute dtype (the head runs in it, accumulating in float32).
      wte: (V, D) the tied embedding.
      targets: (N,) int token ids in [0, V).
      weights: (N,) float32, 0 where a position carries no loss.
      chunk: positions per chunk; at most (chunk, V) logits exist at a time, in either pass.
      label_smoothing: eps in [0, 1), a Python float: each CE becomes PyTorch's smoothed one,
        (1 - eps) CE + eps mean_v(-log p_v) (``F.cross_entropy(..., label_smoothing=eps)``); its gradient
        w.r.t. the logits is w (softmax - (1 - eps) onehot(target) - eps / V).
    """

    def body(total, xs):
        h_c, t_c, w_c = xs
        return total + jnp.sum(w_c * _chunk_losses(h_c, wte, t_c, label_smoothing)[2]), None

    return jax.lax.scan(body, jnp.zeros((), jnp.float32), _chunked(chunk, h, targets, weights))[0]


def _head_fwd(h, wte, targets, weights, chunk, label_smoothing):
    # With symbolic zeros each argument arrives as (value, perturbed): wte's gradient is formed
    # only when wte trains, the weights' only when something differentiates them.
    want_dwte, want_dweights = wte.perturbed, weights.perturbed
    h, wte, targets, weights = h.value, wte.value, targets.value, weights.value
    n, vocab = h.shape[0], wte.shape[0]

    def body(carry, xs):
        total, dwte = carry
        h_c, t_c, w_c = xs
        logits = _logits(h_c, wte)
        shifted = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
        total_exp = jnp.sum(shifted, axis=-1, keepdims=True)
        lse = (jnp.log(total_exp) + jnp.max(logits, axis=-1, keepdims=True))[:, 0]
        losses = lse - jnp.take_along_axis(logits, t_c[:, None], axis=-1)[:, 0]
        # d(Σ w CE)/d logits = w (softmax - onehot(target)), from the same exponentials
        onehot = (jnp.arange(vocab) == t_c[:, None]).astype(jnp.float32)
        if label_smoothing:  # the target's mass spread: (1 - eps) on it, eps / V on every token
            losses = _smoothed(losses, logits, lse, label_smoothing)
            onehot = (1 - label_smoothing) * onehot + label_smoothing / vocab
        dlogits = (w_c[:, None] * (shifted / total_exp - onehot)).astype(h.dtype)
        dh = jnp.dot(dlogits, wte.astype(h.dtype), preferred_element_type=jnp.float32)
        if want_dwte:
            dwte = dwte + jnp.dot(dlogits.T, h_c, preferred_element_type=jnp.float32)
        return (total + jnp.sum(w_c * losses), dwte), (dh, losses)

    init = (jnp.zeros((), jnp.float32), jnp.zeros(wte.shape, jnp.float32) if want_dwte else None)
    (total, dwte), (dh, losses) = jax.lax.scan(body, init, _chunked(chunk, h, targets, weights))
    dh = dh.reshape(-1, h.shape[1])[:n].astype(h.dtype)
    dwte = None if dwte is None else dwte.astype(wte.dtype)
    return total, (dh, dwte, losses.reshape(-1)[:n] if want_dweights else None)


def _head_bwd(chunk, label_smoothing, residuals, g):
    dh, dwte, losses = residuals
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return None, None, None, None
    scale = lambda x: None if x is None else (g * x).astype(x.dtype)  # noqa: E731
    return scale(dh), scale(dwte), None, scale(losses)


head_loss_sum.defvjp(_head_fwd, _head_bwd, symbolic_zeros=True)


def head_argmax(h: jax.Array, wte: jax.Array, chunk: int = CHUNK) -> jax.Array:
    """(N,) int32 argmax of the tied head's logits at each of h's (N, D) positions, `chunk` at a time."""
    (h_c,) = _chunked(chunk, h)
    predictions = jax.lax.map(lambda x: jnp.argmax(_logits(x, wte), axis=-1).astype(jnp.int32), h_c)
    return predictions.reshape(-1)[: h.shape[0]]


def hidden_states(model, variables: PyTree, batch: Mapping[str, jax.Array], rng: jax.Array | None = None):
    """`GPT2.hidden` of a batch (packed or not): (R, L, D). `rng`: a dropout key, or None (deterministic)."""
    deterministic = rng is None
    return model.apply(
        variables,
        batch["input_ids"],
        None,
        batch.get("position_ids"),
        deterministic,
        segment_ids=batch.get("segment_ids"),
        rngs=None if deterministic else {"dropout": rng},
        method="hidden",
    )


def at_loss_positions(x: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
    """x (R, L, ...) at the batch's ``loss_index`` (R, K) -> (R * K, ...); every position without one."""
    if "loss_index" in batch:
        index = batch["loss_index"].reshape(*batch["loss_index"].shape, *[1] * (x.ndim - 2))
        x = jnp.take_along_axis(x, index, axis=1)
    return x.reshape(-1, *x.shape[2:])


def loss_sums(
    model,
    variables: PyTree,
    batch: Mapping[str, jax.Array],
    rng: jax.Array | None = None,
    *,
    chunk: int = CHUNK,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """(sum of masked token losses, number of masked tokens) of a batch, both float32 scalars.

    Args:
      model: a `jlora.GPT2`.
      variables: ``{"params": base, "lora": adapters}`` (or the base alone).
      batch: ``input_ids``, ``targets``, ``loss_mask``, each (R, L); optionally ``loss_index``,
        ``segment_ids``, ``position_ids`` (see the module docstring).
      rng: a dropout key to train with dropout, or None for the deterministic model.
      chunk: positions per LM-head chunk.
      label_smoothing: eps of PyTorch's label smoothing (`head_loss_sum`); 0: plain cross-entropy. Training
        reads it from ``OptimConfig.label_smoothing``; evaluation always scores plain cross-entropy.
    """
    hidden = hidden_states(model, variables, batch, rng)
    mask = batch["loss_mask"].astype(jnp.float32)
    weights = at_loss_positions(mask, batch)
    targets = jnp.where(weights > 0, at_loss_positions(batch["targets"], batch), 0)  # a pad target may be -100
    wte = model.head_weight(variables["params"])
    h = at_loss_positions(hidden, batch)
    return head_loss_sum(h, wte, targets, weights, chunk, label_smoothing), jnp.sum(mask)


def loss_argmax(model, variables: PyTree, batch: Mapping[str, jax.Array], *, chunk: int = CHUNK) -> jax.Array:
    """(R, K) the greedy next token at each of the batch's loss positions (deterministic model)."""
    hidden = at_loss_positions(hidden_states(model, variables, batch), batch)
    predictions = head_argmax(hidden, model.head_weight(variables["params"]), chunk)
    return predictions.reshape(batch["input_ids"].shape[0], -1)
