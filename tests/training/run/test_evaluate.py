"""Evaluation on shaped batches: the same mean loss as on full rows, exact match from the loss positions."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.core.update.step import EvalStep
from jlora.training.data.batching import Layout, shape_batch
from jlora.training.data.rows import eval_batches, prompt_tokens, tokenize
from jlora.training.data.sources import Example
from jlora.training.data.tokenizer import ByteTokenizer
from jlora.training.run.evaluate import exact_match, greedy_exact_match, greedy_predictor, mean_loss, n_batches


@pytest.fixture(scope="module")
def setup():
    config = jlora.GPT2Config(vocab_size=257, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    model = jlora.GPT2(config)
    variables = {"params": jlora.init_params(jax.random.key(0), config)}
    examples = [Example("Q" + "abcdefg"[: 1 + i % 7], " " + "xyz"[: 1 + i % 3]) for i in range(10)]
    return model, variables, tokenize(examples, ByteTokenizer(), seq_len=32)


EOT = 256  # the byte tokenizer's end-of-text
BYTES = ByteTokenizer()


def test_mean_loss_on_shaped_batches_equals_full_rows(setup):
    model, variables, data = setup
    eval_step = jlora.make_eval_step(model, n_devices=1)
    full = mean_loss(eval_step, variables, data, 4)
    shaped = mean_loss(eval_step, variables, data, 4, feed=lambda b: shape_batch(b, Layout(8, pack=True)))
    assert shaped == pytest.approx(full, rel=1e-6)


def test_exact_match_from_loss_positions(setup):
    model, variables, data = setup
    greedy = np.argmax(np.asarray(model.apply(variables, data.input_ids)), axis=-1)  # the full head
    # make rows 0, 3, 4, 8 answerable: their loss targets become the model's own greedy tokens
    answerable = np.isin(np.arange(len(data)), [0, 3, 4, 8])[:, None] & (data.loss_mask > 0)
    doctored = dataclasses.replace(data, targets=np.where(answerable, greedy, data.targets).astype(np.int32))
    predict = greedy_predictor(model)
    assert exact_match(predict, variables, doctored, n=10, batch_size=4, layout=Layout(8)) == 0.4
    assert exact_match(predict, variables, doctored, n=5, batch_size=4) == 0.6  # rows 0-4: three of five


@pytest.mark.parametrize(("rows", "batch_size", "max_batches", "n"), [(20, 8, None, 10), (20, 8, 2, 20), (16, 8, 5, 7)])
def test_progress_is_called_once_per_batch(rows, batch_size, max_batches, n):
    data = tokenize([Example(f"q{i}", "a") for i in range(rows)], ByteTokenizer(), seq_len=8)
    calls = []
    ones = EvalStep(lambda variables, batch: (np.float32(1.0), np.float32(1.0)), jlora.mesh_placement(devices=1))
    mean_loss(ones, None, data, batch_size, max_batches=max_batches, progress=lambda: calls.append("loss"))
    zeros = lambda variables, batch: np.zeros_like(batch["loss_index"])  # noqa: E731
    exact_match(zeros, None, data, n, batch_size, progress=lambda: calls.append("exact"))
    assert calls.count("loss") == n_batches(rows, batch_size, max_batches)
    assert calls.count("exact") == n_batches(min(n, rows), batch_size)


# --- exact match from one forward pass ---------------------------------------------------------------------


def bigram_next(token: int) -> int:
    """A toy greedy model: letters step to the next letter, 'z' ends the text, ':' -> ' ' -> 'v'."""
    if ord("a") <= token < ord("z"):
        return token + 1
    return {ord("z"): EOT, ord(":"): ord(" "), ord(" "): ord("v")}.get(token, ord("?"))


def test_greedy_exact_match_equals_greedy_decoding():
    examples = [Example("Q:", " vwxyz"), Example("Q:", " vwx"), Example("R;", " vwxyz"), Example("Qz:", " vwxyz")]
    data = tokenize(examples, BYTES, seq_len=12)
    predictions = np.vectorize(bigram_next)(data.input_ids)  # teacher forcing: one "forward pass"

    def greedy(example, max_new=20):
        prompt = prompt_tokens(example, BYTES)
        tokens = list(prompt)
        while len(tokens) < len(prompt) + max_new and (len(tokens) == len(prompt) or tokens[-1] != EOT):
            tokens.append(bigram_next(tokens[-1]))
        return tokens[len(prompt) :]

    decoded = [greedy(ex) == BYTES.encode(ex.completion) + [EOT] for ex in examples]
    assert decoded == [True, False, False, True]
    assert greedy_exact_match(predictions, data.targets, data.loss_mask).tolist() == decoded
    padded = next(eval_batches(data, 6))  # the two padding rows never count as matches
    as_jax = greedy_exact_match(
        jnp.asarray(np.vectorize(bigram_next)(padded["input_ids"])), padded["targets"], padded["loss_mask"]
    )
    assert np.asarray(as_jax).tolist() == decoded + [False, False]
