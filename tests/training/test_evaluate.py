"""Evaluation's progress callback: called once per batch, as many times as `n_batches` announces."""

import numpy as np
import pytest

from jlora.training.data import Example, tokenize
from jlora.training.evaluate import exact_match, mean_loss, n_batches
from jlora.training.tokenizer import ByteTokenizer


@pytest.mark.parametrize(("rows", "batch_size", "max_batches", "n"), [(20, 8, None, 10), (20, 8, 2, 20), (16, 8, 5, 7)])
def test_progress_is_called_once_per_batch(rows, batch_size, max_batches, n):
    data = tokenize([Example(f"q{i}", "a") for i in range(rows)], ByteTokenizer(), seq_len=8)
    calls = []
    ones = lambda variables, batch: (np.float32(1.0), np.float32(1.0))  # noqa: E731
    mean_loss(ones, None, data, batch_size, max_batches=max_batches, progress=lambda: calls.append("loss"))
    argmax = lambda variables, ids: np.zeros_like(ids)  # noqa: E731
    exact_match(argmax, None, data, n, batch_size, progress=lambda: calls.append("exact"))
    assert calls.count("loss") == n_batches(rows, batch_size, max_batches)
    assert calls.count("exact") == n_batches(min(n, rows), batch_size)
