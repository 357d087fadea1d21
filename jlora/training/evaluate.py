"""Evaluation on a held-out set: mean loss over answer tokens, perplexity, greedy exact match.

    eval_step = make_eval_step(model)                       # (masked loss sum, token count) of a batch
    mean_loss(eval_step, variables, val_data, batch_size=8, feed=lambda b: shape_batch(b, layout))
    exact_match(greedy_predictor(model), variables, val_data, n=64, batch_size=8, layout=layout)

Both take ``progress``, called after each batch (e.g. a progress bar's ``update``), and
`n_batches` says how many calls to expect: an evaluation of a large model on a CPU can run for
minutes, and should show that it is moving.

Exact match needs no decoding loop: with the true tokens as input, greedy decoding from the
prompt reproduces the completion exactly when every answer position's argmax is right
(`jlora.training.data.greedy_exact_match`), so one teacher-forced forward pass decides it. Both
run on batches shaped like the training ones (`jlora.training.batching`): trimmed to their
content, and the LM head only at the positions that carry loss.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import numpy as np

from jlora.core.gpt2 import GPT2
from jlora.core.loss import loss_argmax
from jlora.core.step import EvalStep, step_inputs
from jlora.training.batching import Layout, shape_batch
from jlora.training.data import TokenizedData, eval_batches, greedy_exact_match


def mean_loss(
    eval_step: EvalStep,
    variables,
    data: TokenizedData,
    batch_size: int,
    *,
    max_batches: int | None = None,
    feed: Callable[[dict], dict] | None = None,
    progress: Callable[[], object] | None = None,
) -> float:
    """Mean masked loss over `data`'s evaluation batches (the first `max_batches`), divided once.

    `eval_step` is a `make_eval_step`; `feed` places a host batch (e.g. shards it for pmap);
    `progress()` is called after each batch.
    """
    total, count = 0.0, 0.0
    for i, batch in enumerate(eval_batches(data, batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        s, c = eval_step(variables, batch if feed is None else feed(batch))
        # pmap's psum leaves the same total on every device: read one copy
        total += float(np.asarray(s).reshape(-1)[0])
        count += float(np.asarray(c).reshape(-1)[0])
        if progress is not None:
            progress()
    return total / max(count, 1.0)


def n_batches(n_rows: int, batch_size: int, max_batches: int | None = None) -> int:
    """Batches `mean_loss` (with `max_batches`) or `exact_match` (of `n_rows` rows) runs.

    >>> n_batches(200, 8), n_batches(200, 8, max_batches=4), n_batches(60, 8)
    (25, 4, 8)
    """
    batches = -(-n_rows // batch_size)
    return batches if max_batches is None else min(batches, max_batches)


def loss_and_perplexity(loss: float) -> dict[str, float]:
    """{"val_loss", "val_ppl"}; the perplexity is capped at e^50 rather than overflowing."""
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


def greedy_predictor(model: GPT2) -> Callable:
    """``predict(variables, batch) -> (R, K)`` greedy next token at each of a shaped batch's loss positions.

    jit-compiled; the LM head runs at the K loss positions of each row only (`jlora.core.loss.loss_argmax`).
    """
    return jax.jit(lambda variables, batch: loss_argmax(model, variables, batch))


def exact_match(
    predict: Callable,
    variables: dict,
    data: TokenizedData,
    n: int,
    batch_size: int,
    *,
    layout: Layout | None = None,
    progress: Callable[[], object] | None = None,
) -> float:
    """Fraction of the first `n` rows whose completion greedy decoding reproduces exactly.

    `predict` is a `greedy_predictor`; one teacher-forced forward pass per batch decides it, on
    batches trimmed as `layout` says (rows are never packed here: each row is one answer).
    `progress()` is called after each batch.
    """
    layout = dataclasses.replace(layout or Layout(), pack=False)
    hits, rows = 0, 0
    for batch in eval_batches(data, batch_size):
        take = min(batch_size, n - rows)
        if take <= 0:
            break
        batch = shape_batch(batch, layout)
        predictions = np.asarray(predict(variables, step_inputs(batch)))
        at = {k: np.take_along_axis(batch[k], batch["loss_index"], axis=1) for k in ("targets", "loss_mask")}
        ok = greedy_exact_match(predictions, at["targets"], at["loss_mask"])[:take]
        real = batch["loss_mask"][:take].any(axis=-1)
        hits, rows = hits + int(ok[real].sum()), rows + int(real.sum())
        if progress is not None:
            progress()
    return hits / max(rows, 1)
