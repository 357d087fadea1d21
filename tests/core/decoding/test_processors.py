"""The repetition processors against transformers' own, on rows with and without left padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

from jlora.core.decoding.processors import ban_repeated_ngrams, penalize_repeats

VOCAB = 7  # a small vocabulary: the random rows repeat n-grams often


def rows(seed: int, n_rows: int = 6, length: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (n_rows, length))


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_equals_transformers(n):
    seq = rows(n)
    scores = np.random.default_rng(10 + n).normal(size=(seq.shape[0], VOCAB)).astype(np.float32)
    expected = NoRepeatNGramLogitsProcessor(n)(torch.tensor(seq), torch.tensor(scores)).numpy()
    real = jnp.ones(seq.shape, bool)
    ours = np.asarray(ban_repeated_ngrams(jnp.asarray(scores), jnp.asarray(seq), real, seq.shape[1], n))
    np.testing.assert_array_equal(ours, expected)
    assert np.isinf(expected).any() and not np.isinf(expected).all()  # some tokens banned, not all


def test_no_repeat_ngram_reads_only_the_filled_real_slots():
    """A left-padded row with unwritten slots after it is banned what the row alone is banned."""
    seq = rows(5)
    scores = np.zeros((seq.shape[0], VOCAB), np.float32)
    alone = NoRepeatNGramLogitsProcessor(3)(torch.tensor(seq[:, :20]), torch.tensor(scores)).numpy()
    padded = np.concatenate([np.full((6, 5), 3), seq[:, :20], np.full((6, 4), 6)], axis=1)  # 5 pads, 4 unwritten
    real = np.zeros(padded.shape, bool)
    real[:, 5:25] = True
    ours = ban_repeated_ngrams(jnp.asarray(scores), jnp.asarray(padded), jnp.asarray(real), 25, 3)
    np.testing.assert_array_equal(np.asarray(ours), alone)
    # two real tokens cannot complete a 3-gram: nothing banned, whatever the padding holds
    short = ban_repeated_ngrams(jnp.asarray(scores), jnp.asarray(padded), jnp.asarray(real), 7, 3)
    assert not np.isinf(np.asarray(short)).any()
    longer = ban_repeated_ngrams(jnp.asarray(scores), jnp.asarray(padded), jnp.asarray(real), 29, 30)
    np.testing.assert_array_equal(np.asarray(longer), scores)  # an n-gram longer than the buffer: nothing banned


@pytest.mark.parametrize("penalty", [1.3, 0.6])
def test_repetition_penalty_equals_transformers_and_leaves_the_padding_out(penalty):
    seq = rows(7, length=5)
    scores = np.random.default_rng(8).normal(size=(seq.shape[0], VOCAB)).astype(np.float32)
    pads = np.array([0, 2, 1, 3, 0, 4])  # transformers' prompt_ignore_length: the left padding's length
    expected = RepetitionPenaltyLogitsProcessor(penalty, torch.tensor(pads))(torch.tensor(seq), torch.tensor(scores))
    real = np.arange(seq.shape[1]) >= pads[:, None]
    penalize = jax.jit(penalize_repeats)  # as in the decoding loop: the penalty a traced argument
    ours = penalize(jnp.asarray(scores), jnp.asarray(seq), jnp.asarray(real), jnp.float32(penalty))
    np.testing.assert_array_equal(np.asarray(ours), expected.numpy())
    assert not np.array_equal(expected.numpy(), scores)
    np.testing.assert_array_equal(np.asarray(penalize(jnp.asarray(scores), seq, real, jnp.float32(1.0))), scores)
