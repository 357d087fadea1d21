"""Beam search as transformers' ``generate(num_beams=K)`` does it, inside one compiled loop.

Each prompt keeps K running beams and K finished hypotheses; the KV cache holds B x K rows (row
``b * K + k`` is prompt b's beam k), all the same fixed size, and is reordered by gathering rows::

    prefill B prompts ──repeat K──> cache (B K rows), scores (0, -1e9, ..., -1e9) per prompt
      └── each step, while a prompt can still improve and fewer than max_new_tokens were made:
            s = log_softmax(logits) -> repetition penalty -> no repeated n-gram      (B K, V)
            top 2K of (running score + s) over a prompt's K x V continuations
              ├── those ending in end-of-text among the first K, or at max_new_tokens, become
              │   hypotheses, scored (sum of s) / new_tokens ** length_penalty; the best K kept
              └── the best K that do not end run on: their cache rows gathered, their token fed

transformers 5's ``_beam_search`` in full: 2K candidates so that K can always go on; finished
candidates beyond the first K dropped; its -1e9 masks, added in its order, in float32; the stop
rules of ``early_stopping`` (True: a prompt is done once it has K hypotheses; False: once the best
running beam, at its current length, cannot beat the worst of K hypotheses; "never": the same at
max_new_tokens when length_penalty > 0), and the whole batch stopping only when every prompt is
done (a done prompt's late candidates cannot enter its hypotheses). Each prompt's result is its best
hypothesis: its new tokens (end-of-text included, then end-of-text again), length and score.

The length penalties ``t ** length_penalty`` (t = 1 .. max_new_tokens) come in computed on the host in
float64 and rounded to float32, as PyTorch divides a float32 tensor by a Python float, and, with the
other settings, as arguments: changing them does not recompile. The model is reached only through
``next_logits(tokens (B K,), cache) -> (logits (B K, V), cache)``; any cache whose array leaves are
batch-first (scalars are shared) can be reordered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core.decoding.processors import ban_repeated_ngrams, penalize_repeats

NEG = -1.0e9  # transformers' mask value: added, not set, so a masked score keeps its order among the masked


class BeamSettings(NamedTuple):
    """The traced settings of a beam search (`settings` makes them).

    Attributes:
      penalties: (max_new_tokens,) float32, ``t ** length_penalty`` for t = 1 .. max_new_tokens.
      stop_when_full: () bool, early_stopping is True.
      judge_at_max: () bool, early_stopping is "never" and length_penalty > 0: the stop rule assumes the
        best running beam reaches max_new_tokens.
      repetition_penalty: () float32 (1: off).
    """

    penalties: jax.Array
    stop_when_full: jax.Array
    judge_at_max: jax.Array
    repetition_penalty: jax.Array


def settings(
    max_new_tokens: int, length_penalty: float, early_stopping: bool | str, repetition_penalty: float
) -> BeamSettings:
    """`BeamSettings` from the user's values (checked by the caller).

    >>> settings(3, 1.0, False, 1.0).penalties.tolist()
    [1.0, 2.0, 3.0]
    """
    lengths = np.arange(1, max_new_tokens + 1, dtype=np.float64)
    return BeamSettings(
        jnp.asarray(np.float32(lengths**length_penalty)),
        jnp.asarray(early_stopping is True),
        jnp.asarray(early_stopping == "never" and length_penalty > 0.0),
        jnp.float32(repetition_penalty),
    )


def _rows(x: jax.Array, index: jax.Array) -> jax.Array:
    """x (B, M, ...) at index (B, J) along axis 1 -> (B, J, ...)."""
    return jnp.take_along_axis(x, index.reshape(*index.shape, *[1] * (x.ndim - 2)), axis=1)


def beam_search(
    next_logits: Callable[[jax.Array, Any], tuple[jax.Array, Any]],
    logits: jax.Array,
    cache: Any,
    ids: jax.Array,
    mask: jax.Array,
    beam: BeamSettings,
    eos: jax.Array,
    *,
    num_beams: int,
    max_new_tokens: int,
    no_repeat_ngram_size: int = 0,
    penalize: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The best hypothesis of each prompt: (tokens (B, max_new_tokens), lengths (B,), scores (B,)).

    Args:
      next_logits: ``(tokens (B K,), cache) -> (logits (B K, V), cache)``: one more token per row.
      logits: (B, V) float32, the logits after each prompt (the prefill's).
      cache: the prefill's cache of B rows, with room for max_new_tokens more slots.
      ids, mask: (B, P) the left-padded prompts and their mask.
      beam: `BeamSettings`.
      eos: () int32, end-of-text (-1: none; hypotheses end at max_new_tokens).
      num_beams: K (static).
      max_new_tokens: N (static).
      no_repeat_ngram_size: n (static; 0: off).
      penalize: apply beam.repetition_penalty (static).
    """
    (batch, prompt), k, n_new = ids.shape, num_beams, max_new_tokens
    vocab = logits.shape[-1]
    length = prompt + n_new
    fill = jnp.maximum(eos, 0)
    expand = lambda x: x if x.ndim == 0 else jnp.repeat(x, k, axis=0)  # noqa: E731
    first_real = jnp.repeat(prompt - mask.sum(axis=1), k)[:, None]  # (B K, 1): left padding before it
    slots = jnp.arange(length)

    def more(state):
        step, _, _, _, _, _, _, finished, _, open_ = state
        return (step < n_new) & jnp.any(open_) & ~(beam.stop_when_full & jnp.all(finished))

    def one_token(state):
        step, logits, cache, seq, running, f_tokens, f_scores, finished, f_lengths, open_ = state
        cur = prompt + step
        scores = jax.nn.log_softmax(logits, axis=-1)  # (B K, V)
        flat = seq.reshape(batch * k, length)
        real = (slots >= first_real) & (slots < cur)
        if penalize:
            scores = penalize_repeats(scores, flat, real, beam.repetition_penalty)
        if no_repeat_ngram_size:
            scores = ban_repeated_ngrams(scores, flat, real, cur, no_repeat_ngram_size)
        scores = scores.reshape(batch, k, vocab) + running[:, :, None]
        top, index = jax.lax.top_k(scores.reshape(batch, k * vocab), 2 * k)  # (B, 2K), best first
        source, token = index // vocab, (index % vocab).astype(jnp.int32)
        candidates = jnp.where(slots == cur, token[..., None], _rows(seq, source))  # (B, 2K, L)
        ends = (token == eos) | (step + 1 >= n_new)

        # The best K that go on (at most K of the 2K end in end-of-text: one per beam).
        running, keep = jax.lax.top_k(top + ends.astype(jnp.float32) * NEG, k)
        seq, parent = _rows(candidates, keep), _rows(source, keep)

        # Hypotheses: the first K candidates that end, length-penalised, unless the prompt is done.
        new = ends & (jnp.arange(2 * k) < k)
        hyp = top / beam.penalties[step]
        hyp += (beam.stop_when_full & jnp.all(finished, axis=1, keepdims=True)).astype(jnp.float32) * NEG
        hyp += (~open_[:, None]).astype(jnp.float32) * NEG
        hyp += (~new).astype(jnp.float32) * NEG
        merged = jnp.concatenate([f_scores, hyp], axis=1)  # (B, 3K)
        f_scores, best = jax.lax.top_k(merged, k)
        f_tokens = _rows(jnp.concatenate([f_tokens, candidates[:, :, prompt:]], axis=1), best)
        finished = _rows(jnp.concatenate([finished, new], axis=1), best)
        made = jnp.full((batch, 2 * k), step + 1, jnp.int32)
        f_lengths = _rows(jnp.concatenate([f_lengths, made], axis=1), best)

        rows = (jnp.arange(batch)[:, None] * k + parent).reshape(-1)
        cache = jax.tree.map(lambda x: x if x.ndim == 0 else x[rows], cache)
        logits, cache = next_logits(seq[:, :, cur].reshape(-1), cache)

        # Can the best running beam still beat the worst of K hypotheses? (transformers' heuristic)
        at = jnp.where(beam.judge_at_max, n_new - 1, step)
        best_possible = running[:, :1] / beam.penalties[at]
        worst = jnp.where(finished, jnp.min(f_scores, axis=1, keepdims=True), NEG)
        open_ = open_ & jnp.any(best_possible > worst, axis=1)
        return step + 1, logits, cache, seq, running, f_tokens, f_scores, finished, f_lengths, open_

    seq = jnp.concatenate([ids, jnp.full((batch, n_new), fill, ids.dtype)], axis=1)
    state = (
        0,
        jnp.repeat(logits, k, axis=0),
        jax.tree.map(expand, cache),
        jnp.repeat(seq[:, None], k, axis=1).astype(jnp.int32),  # (B, K, L)
        jnp.full((batch, k), NEG, jnp.float32).at[:, 0].set(0.0),  # one beam at first: no K copies of a token
        jnp.full((batch, k, n_new), fill, jnp.int32),
        jnp.full((batch, k), NEG, jnp.float32),
        jnp.zeros((batch, k), bool),
        jnp.zeros((batch, k), jnp.int32),
        jnp.ones(batch, bool),
    )
    *_, f_tokens, f_scores, _, f_lengths, _ = jax.lax.while_loop(more, one_token, state)
    return f_tokens[:, 0], f_lengths[:, 0], f_scores[:, 0]
