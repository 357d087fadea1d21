"""transformers' repetition logits processors, over each row's real tokens, inside the compiled loop.

Both read the tokens a row holds so far: a (R, L) buffer with the left-padded prompt and the
tokens made since, and ``real`` (R, L) marking the prompt's real tokens and the new ones (left
padding and the slots not yet written are not)::

    seq   0 0 0 17 3 88 | 41 9 . .      real  F F F T T T | T T F F      cur = 8 slots filled

- `penalize_repeats` (transformers' ``RepetitionPenaltyLogitsProcessor``, CTRL's penalty): every token
  the row holds has its score multiplied by ``penalty`` where it is negative, divided where positive.
  transformers leaves the left padding out too (its ``prompt_ignore_length``).
- `ban_repeated_ngrams` (``NoRepeatNGramLogitsProcessor``): a token that would complete an n-gram the
  row already holds gets -inf. transformers counts the left padding's n-grams as well; here only real
  tokens count, so a row is banned what it would be banned alone (the same as transformers' whenever
  the padding id is not among the row's last n - 1 tokens, e.g. end-of-text as padding in a beam).

Each is a no-op at its neutral setting (``penalty`` 1, no complete n-gram), and all shapes are fixed:
one compilation serves every step.

>>> seq = jnp.array([[0, 5, 6, 7, 5, 6]]); real = jnp.array([[False, True, True, True, True, True]])
>>> banned = ban_repeated_ngrams(jnp.zeros((1, 9)), seq, real, 6, 3)   # "5 6" was followed by 7
>>> jnp.isinf(banned).nonzero()[1].tolist()
[7]
>>> penalize_repeats(jnp.array([[-1.0, 2.0, -1.0]]), jnp.array([[0, 1]]), jnp.ones((1, 2), bool), 2.0).tolist()
[[-2.0, 1.0, -1.0]]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _holds(seq: jax.Array, keep: jax.Array, vocab: int) -> jax.Array:
    """(R, vocab) bool: which tokens `seq` (R, L) holds at the positions `keep` (R, L) marks."""
    rows = jnp.arange(seq.shape[0])[:, None]
    spare = jnp.zeros((seq.shape[0], vocab + 1), bool)  # column `vocab` takes the positions not kept
    return spare.at[rows, jnp.where(keep, seq, vocab)].set(True)[:, :vocab]


def penalize_repeats(scores: jax.Array, seq: jax.Array, real: jax.Array, penalty: float | jax.Array) -> jax.Array:
    """`scores` (R, V) with each token `seq` (R, L) holds at `real` positions penalised: s * penalty if s < 0,
    else s / penalty (transformers' RepetitionPenaltyLogitsProcessor; penalty > 1 discourages repeats)."""
    held = _holds(seq, real, scores.shape[-1])
    return jnp.where(held, jnp.where(scores < 0, scores * penalty, scores / penalty), scores)


def ban_repeated_ngrams(scores: jax.Array, seq: jax.Array, real: jax.Array, cur: int | jax.Array, n: int) -> jax.Array:
    """`scores` (R, V) with -inf for every token that would repeat an n-gram of the row's real tokens.

    Args:
      scores: (R, V) the next token's scores.
      seq: (R, L) each row's tokens; slots ``0 .. cur - 1`` are filled.
      real: (R, L) which filled slots hold real tokens (one run of them, ending at ``cur``: left padding).
      cur: the number of filled slots (may be traced).
      n: the n-gram size (static), >= 1.
    """
    width = seq.shape[1] - n + 1  # windows seq[i : i + n]
    if width < 1:  # the row cannot hold an n-gram: nothing to ban
        return scores
    windows = jnp.stack([seq[:, j : j + width] for j in range(n)], axis=-1)  # (R, W, n)
    # The row's last n - 1 tokens; where fewer are real no window below is complete, so none matches.
    prefix = jax.lax.dynamic_slice_in_dim(seq, jnp.maximum(cur - (n - 1), 0), n - 1, axis=1)  # (R, n - 1)
    complete = real[:, :width] & (jnp.arange(width) + n - 1 < cur)  # real runs to cur: the whole window is real
    matches = complete & jnp.all(windows[..., :-1] == prefix[:, None, :], axis=-1)
    return jnp.where(_holds(windows[..., -1], matches, scores.shape[-1]), -jnp.inf, scores)
