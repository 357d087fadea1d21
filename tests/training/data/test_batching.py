"""Batch shaping: the bucket rule and packing against hand counts, the compiled shapes a run has,
and what makes it safe: every example's loss and gradient are those it has alone, unpadded."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

import jlora
from jlora.core.update.loss import loss_sums
from jlora.errors import ConfigError
from jlora.training.data.batching import Layout, capacity, ladder, round_up, run_shapes, shape_batch, shape_bound
from jlora.training.data.rows import batch_at, tokenize
from jlora.training.data.sources import Example
from jlora.training.run.config import from_dict

E = 100  # end-of-text of the tiny checkpoint's 101-token vocabulary


@dataclasses.dataclass(frozen=True)
class ModTokenizer:
    """Characters as ids 0..99 (code point mod 100), 100 as end-of-text: fits the tiny GPT-2."""

    eos_token_id: int = E
    vocab_size: int = 101

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 100 for c in text]


def short_examples(n: int) -> list[Example]:
    """QA-like rows of 7 to 16 tokens with answers of 2 to 5 tokens."""
    return [Example("Q" + "abcdefgh"[: 2 + i % 7], " " + "xyz!"[: 1 + i % 4]) for i in range(n)]


def test_bucket_rule_by_hand():
    assert [round_up(n, 64, 512) for n in (1, 64, 65, 500)] == [64, 64, 128, 512]
    assert [round_up(n, "pow2", 100) for n in (1, 3, 64, 65)] == [1, 4, 64, 100]
    assert round_up(7, "none", 512) == 512
    assert ladder(64, 512) == [64, 128, 192, 256, 320, 384, 448, 512]
    assert ladder("pow2", 100) == [1, 2, 4, 8, 16, 32, 64, 100] and ladder("none", 512) == [512]
    assert (capacity(3, 64), capacity(9, 64), capacity(40, 32)) == (8, 16, 32)
    # L in 64..512; K in {8, 16, ..., < L} and L: 4 + 5 + 6 + 6 + 7 + 7 + 7 + 7 shapes
    assert shape_bound(512, 8, Layout(64)) == 49
    assert shape_bound(512, 8, Layout(64, pack=True, row_multiple=2)) == 4 * 49  # R in 2, 4, 6, 8
    # "octaves": multiples of 8 up to 64, then four lengths per doubling
    assert [round_up(n, "octaves", 512) for n in (1, 8, 9, 57, 64, 65, 129, 257, 500)] == [
        8, 8, 16, 64, 64, 80, 160, 320, 512
    ]  # fmt: skip
    assert ladder("octaves", 512) == [*range(8, 65, 8), 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512]
    assert all(round_up(n, "octaves", 4096) - n < n / 4 for n in range(33, 4097))  # padding under a quarter
    # K per L: 1, 2, 3, 3, then 4 up to 64, 5 up to 128, 6 up to 256, 7 up to 512
    assert shape_bound(512, 8, Layout("octaves")) == 1 + 2 + 3 + 3 + 4 * 4 + 5 * 4 + 6 * 4 + 7 * 4
    assert Layout().buckets == from_dict({}).data.buckets == "octaves"
    refused = "data.buckets must be a positive length step, 'octaves', 'pow2' or 'none'"
    for bad in (0, -64, "fine", True):
        with pytest.raises(ConfigError, match=refused):
            Layout(bad)
    with pytest.raises(ConfigError, match="data.buckets"):
        from_dict({"data": {"buckets": "fine"}})
    assert from_dict({"data": {"buckets": "pow2", "pack": True}}).data.buckets == "pow2"


def test_trimming_and_packing_by_hand():
    examples = [Example("abc", "d"), Example("abcdefghij", "k"), Example("abcdefg", "h"), Example("a", "b")]
    data = tokenize(examples, ModTokenizer(), seq_len=32)  # lengths 5, 12, 9, 3 (E, prompt, answer; closing E)
    batch = data.rows(np.arange(4))
    assert batch["attention_mask"].sum(axis=1).tolist() == [5, 12, 9, 3]

    rows = shape_batch(batch, Layout(8))
    assert rows["input_ids"].shape == (4, 16)  # the longest row, 12, rounded up to 16
    for k in ("input_ids", "targets", "loss_mask", "attention_mask"):
        np.testing.assert_array_equal(rows[k], batch[k][:, :16])
    # K = 8: the two loss positions (answer, closing E) of each row, then positions without loss
    assert rows["loss_index"][:, :2].tolist() == [[3, 4], [10, 11], [7, 8], [1, 2]]
    assert (
        rows["loss_index"].shape == (4, 8)
        and not np.take_along_axis(rows["loss_mask"], rows["loss_index"][:, 2:], 1).any()
    )

    one = shape_batch(batch, Layout(8, pack=True))  # 29 tokens: one sequence of 32
    assert one["input_ids"].shape == (1, 32)
    assert one["segment_ids"][0].tolist() == [1] * 5 + [2] * 12 + [3] * 9 + [4] * 3 + [0] * 3
    assert one["position_ids"][0, :29].tolist() == [*range(5), *range(12), *range(9), *range(3)]
    real = batch["attention_mask"] > 0
    np.testing.assert_array_equal(one["input_ids"][0, :29], batch["input_ids"][real])
    np.testing.assert_array_equal(one["loss_mask"][0, :29], batch["loss_mask"][real])

    # two sequences: longest first into the emptiest, 12 | 9, then 5 -> the 9, 3 -> the 12
    two = shape_batch(batch, Layout(8, pack=True, row_multiple=2))
    assert two["input_ids"].shape == (2, 16)
    assert two["segment_ids"].tolist() == [[2] * 12 + [4] * 3 + [0], [1] * 5 + [3] * 9 + [0] * 2]
    assert two["loss_index"][:, :4].tolist() == [[10, 11, 13, 14], [3, 4, 12, 13]]


def owner(shaped: dict) -> np.ndarray:
    """(R, L): the batch row each position belongs to (-1 for padding)."""
    if "segment_ids" in shaped:
        return shaped["segment_ids"] - 1
    rows = np.broadcast_to(np.arange(shaped["input_ids"].shape[0])[:, None], shaped["input_ids"].shape)
    return np.where(shaped["attention_mask"] > 0, rows, -1)


@pytest.fixture(scope="module")
def tiny_model(tiny_hf, random_b):
    model, params = jlora.load_gpt2(tiny_hf[0], lora=jlora.LoraConfig(r=4, alpha=8))
    lora = random_b(jlora.init_lora(jax.random.key(0), model, params))
    grad = jax.jit(
        jax.value_and_grad(lambda lora, b: loss_sums(model, {"params": params, "lora": lora}, b), has_aux=True)
    )
    return grad, lora


LAYOUTS = [Layout(8), Layout("pow2", pack=True, row_multiple=2)]  # trimmed rows; two packed sequences


def test_every_example_keeps_its_unpadded_loss_and_gradient(tiny_model):
    """Trimmed or packed, each row's loss sum and gradient are those of the row alone, with no padding."""
    grad, lora = tiny_model
    examples = [Example("Qabcd", " xy"), Example("Qab", " xyz!"), Example("Qabcdefgh", " x"), Example("Qa", " xyz!")]
    data = tokenize(examples, ModTokenizer(), seq_len=24)  # lengths 8, 8, 11, 8: two single-row shapes
    lengths = data.attention_mask.sum(axis=1)
    alone = []
    for i, n in enumerate(lengths):
        (s, count), g = grad(
            lora, {k: data.rows(np.array([i]))[k][:, :n] for k in ("input_ids", "targets", "loss_mask")}
        )
        alone.append((float(s), float(count), g))

    batch = data.rows(np.arange(len(examples)))
    for layout in LAYOUTS:
        shaped = shape_batch(batch, layout)
        of = owner(shaped)
        for i, (s, count, g) in enumerate(alone):
            only_i = {**shaped, "loss_mask": shaped["loss_mask"] * (of == i)}
            only_i.pop("attention_mask")
            (s_i, count_i), g_i = grad(lora, only_i)
            assert float(count_i) == count
            np.testing.assert_allclose(float(s_i), s, rtol=1e-5, err_msg=f"{layout}, row {i}")
            for a, b in zip(jax.tree.leaves(g_i), jax.tree.leaves(g), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"{layout}, row {i}")


def test_a_run_compiles_the_shapes_it_predicts():
    data = tokenize(short_examples(24), ModTokenizer(), seq_len=32)
    config = jlora.GPT2Config(vocab_size=101, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    model = jlora.GPT2(config, jlora.LoraConfig(r=2, alpha=4))
    params = jlora.init_params(jax.random.key(0), config)
    variables = {"params": params, "lora": jlora.init_lora(jax.random.key(1), model, params)}
    mask = jlora.trainable_mask(variables)
    cfg = jlora.OptimConfig(lr=1e-3, total_steps=12)
    optimizer = jlora.make_optimizer(cfg, jlora.partition(variables, mask)[0])
    state = jlora.init_state(variables, mask, optimizer)
    step = jlora.make_train_step(model, optimizer, cfg, n_devices=1)
    layout = Layout(4, pack=True)
    frozen = state.frozen
    computed, tokens = 0, 0
    for i in range(12):
        batch = shape_batch(batch_at(data, i, 6, seed=0), layout)
        computed, tokens = computed + batch["input_ids"].size, tokens + int(batch["attention_mask"].sum())
        state, _ = step(state, batch, jax.random.key(2))
    predicted = run_shapes(data, 6, 0, range(12), layout)
    assert step.compiled._cache_size() == len(predicted.shapes) <= shape_bound(32, 6, layout)
    assert len(predicted.shapes) > 1 and sum(predicted.shapes.values()) == 12
    assert (predicted.computed, predicted.tokens) == (computed, tokens)
    assert predicted.padding == pytest.approx(1 - tokens / computed)
    # the frozen base is neither donated nor copied: after every shape, the very same arrays
    assert all(a is b for a, b in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(frozen), strict=True))
