"""Token rows against hand counts, truncation and dropping, and the batch of a step."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jlora.errors import DataError
from jlora.training.data.rows import batch_at, eval_batches, tokenize
from jlora.training.data.sources import Example, bundled_file, read_examples
from jlora.training.data.tokenizer import ByteTokenizer

E = 256  # the byte tokenizer's end-of-text
BYTES = ByteTokenizer()


def toy_data(n: int, seq_len: int = 8):
    """n examples whose completion is the n-th letter (targets[:, 1]), so each row is recognisable."""
    return tokenize([Example("q", chr(ord("a") + i)) for i in range(n)], BYTES, seq_len)


# --- tokenizing ------------------------------------------------------------------------------------------------


def test_layout_against_a_hand_count():
    data = tokenize([Example("Q?", " ab"), Example("", "hi")], BYTES, seq_len=8)
    Q, q, sp, a, b, h, i = (ord(c) for c in "Q? abhi")
    # tokens: E Q ? _ a b E  and  E h i E
    assert data.input_ids.tolist() == [[E, Q, q, sp, a, b, E, E], [E, h, i, E, E, E, E, E]]
    assert data.targets.tolist() == [[Q, q, sp, a, b, E, E, E], [h, i, E, E, E, E, E, E]]
    # loss on " ab" and the closing E (not the prompt, not padding); a text counts whole, its first token too
    assert data.loss_mask.tolist() == [[0, 0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]
    assert data.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]
    assert [a.dtype for a in (data.input_ids, data.targets, data.loss_mask, data.attention_mask)] == [
        np.int32,
        np.int32,
        np.float32,
        np.int32,
    ]
    assert (data.n_truncated, data.n_dropped, data.example_index.tolist()) == (0, 0, [0, 1])


def test_bundled_train_loss_tokens_are_exactly_answer_and_end_of_text():
    records = [json.loads(line) for line in bundled_file("train").read_text("utf-8").splitlines()]
    data = tokenize(read_examples("bundled"), BYTES, seq_len=96)
    assert len(data) == len(records) and data.n_truncated == data.n_dropped == 0
    counted = data.loss_mask > 0
    # inputs are the targets shifted by one wherever a token is attended
    attended = data.attention_mask[:, 1:] > 0
    assert np.array_equal(data.input_ids[:, 1:][attended], data.targets[:, :-1][attended])
    assert not counted[data.attention_mask == 0].any()  # padding never counts
    for row, record in enumerate(records):
        answer = list(f" {record['answer']}".encode()) + [E]
        assert data.targets[row][counted[row]].tolist() == answer


def test_truncation_and_dropping_are_counted():
    examples = [
        Example("abc", "defgh"),  # 10 tokens; 7 fit: the completion keeps "de"
        Example("abcdef", "x"),  # the prompt (with its opening E) fills all 6 inputs: dropped
        Example("abcde", "xy"),  # room for exactly one completion target
        Example("a", "b"),  # fits whole
    ]
    data = tokenize(examples, BYTES, seq_len=6)
    assert (len(data), data.n_truncated, data.n_dropped, data.example_index.tolist()) == (3, 2, 1, [0, 2, 3])
    a, b, c, d, e, x = (ord(ch) for ch in "abcdex")
    assert data.input_ids[0].tolist() == [E, a, b, c, d, e]
    assert data.targets[0].tolist() == [a, b, c, d, e, ord("f")]  # cut: no closing E
    assert data.loss_mask[0].tolist() == [0, 0, 0, 1, 1, 1]
    assert data.targets[1].tolist() == [a, b, c, d, e, x] and data.loss_mask[1].tolist() == [0, 0, 0, 0, 0, 1]
    assert "2 truncated, 1 dropped" in data.summary()
    with pytest.raises(DataError, match="none of the 1 examples fits seq_len=6"):
        tokenize(examples[1:2], BYTES, seq_len=6)


# --- batches ---------------------------------------------------------------------------------------------------


def test_batch_at_is_pure_and_covers_each_epoch():
    data = toy_data(12)
    seen = [batch_at(data, step, 4, seed=3)["targets"][:, 1].tolist() for step in range(6)]
    assert sorted(sum(seen[:3], [])) == sorted(sum(seen[3:], [])) == sorted(data.targets[:, 1].tolist())
    assert seen[:3] != seen[3:]  # a new order each epoch
    backwards = [batch_at(data, step, 4, seed=3)["targets"][:, 1].tolist() for step in reversed(range(6))]
    assert backwards[::-1] == seen  # the batch depends on the step only, not on what came before
    other_seed = [batch_at(data, step, 4, seed=4)["targets"][:, 1].tolist() for step in range(3)]
    assert other_seed != seen[:3]
    batch = batch_at(data, 5, 4, seed=3)
    assert set(batch) == {"input_ids", "targets", "loss_mask", "attention_mask"}
    assert all(v.shape == (4, 8) for v in batch.values())


def test_batches_do_not_straddle_epochs():
    data = tokenize([Example("", chr(ord("a") + i)) for i in range(10)], BYTES, seq_len=4)
    rows = [batch_at(data, step, 4, seed=0)["input_ids"][:, 1].tolist() for step in range(4)]
    assert len(set(rows[0] + rows[1])) == 8  # 2 whole batches per epoch, the last 2 of its order skipped
    assert len(set(rows[2] + rows[3])) == 8 and rows[2:] != rows[:2]
    with pytest.raises(DataError, match="batch_size 11"):
        batch_at(data, 0, 11, seed=0)


def test_eval_batches_cover_the_set_in_order_with_static_shapes():
    data = toy_data(10)
    batches = list(eval_batches(data, 4))
    assert len(batches) == 3 and all(b[k].shape == (4, 8) for b in batches for k in b)
    ids = np.concatenate([b["input_ids"] for b in batches])
    assert np.array_equal(ids[:10], data.input_ids)
    mask = np.concatenate([b["loss_mask"] for b in batches])
    assert np.array_equal(mask[:10], data.loss_mask) and not mask[10:].any()
    assert (np.concatenate([b["attention_mask"] for b in batches])[10:] == data.attention_mask[-1]).all()
