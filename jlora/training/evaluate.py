"""Evaluation on a held-out set: mean loss over answer tokens, perplexity, greedy exact match.

    eval_step = make_eval_step(model)                       # (masked loss sum, token count) of a batch
    mean_loss(eval_step, variables, val_data, batch_size=8) # divided once, over the whole set
    exact_match(greedy_predictor(model), variables, val_data, n=64, batch_size=8)
    make_forgetting(trainer, ...)(state)                    # loss, base loss, KL(base || adapted) on held-out text

A population's eval step and predictor (`jlora.core.population`) give each figure as a (K,)
array, one per member, through the same functions.

Exact match needs no decoding loop: with the true tokens as input, greedy decoding from the
prompt reproduces the completion exactly when every answer position's argmax is right
(`jlora.training.data.greedy_exact_match`), so one teacher-forced forward pass decides it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from jlora.core.divergence import forgetting_sums
from jlora.core.gpt2 import GPT2
from jlora.core.optim import combine, partition
from jlora.core.parallel import local_devices, replicate
from jlora.core.step import EvalStep, compile_eval
from jlora.training.data import TokenizedData, eval_batches, greedy_exact_match


def mean_sums(
    eval_step: EvalStep,
    variables,
    data: TokenizedData,
    batch_size: int,
    *,
    max_batches: int | None = None,
    feed: Callable[[dict], dict] | None = None,
) -> list:
    """Each sum `eval_step` returns but the last, divided by the last (the token count), over `data`.

    The evaluation batches (the first `max_batches`) are added up first and divided once. Each
    mean is a float, or a (K,) array from a population's eval step. `feed` places a host batch
    (e.g. shards it for pmap).
    """
    totals = None
    for i, batch in enumerate(eval_batches(data, batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        sums = eval_step(variables, batch if feed is None else feed(batch))
        # pmap's psum leaves the same total on every device: read one copy
        sums = [np.asarray(x, np.float64)[0] if eval_step.pmapped else np.asarray(x, np.float64) for x in sums]
        totals = sums if totals is None else [t + x for t, x in zip(totals, sums, strict=True)]
    *numerators, count = totals
    means = [x / np.maximum(count, 1.0) for x in numerators]
    return [float(m) if m.ndim == 0 else m for m in means]


def mean_loss(
    eval_step: EvalStep,
    variables,
    data: TokenizedData,
    batch_size: int,
    *,
    max_batches: int | None = None,
    feed: Callable[[dict], dict] | None = None,
) -> float | np.ndarray:
    """Mean masked loss over `data`'s evaluation batches (the first `max_batches`), divided once.

    `eval_step` is a `make_eval_step` ((K,) losses from a population's); `feed` places a host batch.
    """
    return mean_sums(eval_step, variables, data, batch_size, max_batches=max_batches, feed=feed)[0]


def loss_and_perplexity(loss: float | np.ndarray) -> dict:
    """{"val_loss", "val_ppl"}; the perplexity is capped at e^50 rather than overflowing."""
    ppl = np.exp(np.minimum(loss, 50.0))
    return {"val_loss": loss, "val_ppl": float(ppl) if np.ndim(ppl) == 0 else ppl}


def greedy_predictor(model: GPT2, axes=None) -> Callable:
    """``predict(variables, ids) -> (B, T)`` argmax of the logits at each position, jit-compiled.

    With `axes` (a population's, `jlora.core.population.member_axes`): (K, B, T), one per member.
    """
    predict = lambda variables, ids: jax.numpy.argmax(model.apply(variables, ids), axis=-1)  # noqa: E731
    return jax.jit(predict if axes is None else jax.vmap(predict, in_axes=(axes, None)))


def exact_match(predict: Callable, variables: dict, data: TokenizedData, n: int, batch_size: int) -> float | np.ndarray:
    """Fraction of the first `n` rows whose completion greedy decoding reproduces exactly.

    `predict` is a `greedy_predictor`; one teacher-forced forward pass per batch decides it.
    A population's predictor gives (K,) fractions, one per member.
    """
    hits, rows = 0, 0
    for batch in eval_batches(data, batch_size):
        take = min(batch_size, n - rows)
        if take <= 0:
            break
        predictions = np.asarray(predict(variables, batch["input_ids"]))
        ok = greedy_exact_match(predictions, batch["targets"], batch["loss_mask"])[..., :take]
        real = batch["loss_mask"][:take].any(axis=-1)
        hits, rows = hits + ok[..., real].sum(axis=-1), rows + int(real.sum())
    fraction = np.asarray(hits, np.float64) / max(rows, 1)
    return float(fraction) if fraction.ndim == 0 else fraction


def make_forgetting(trainer, feed: Callable[[dict], dict], *, pmapped: bool, n_devices: int) -> Callable:
    """``forgetting(state) -> {"forget_loss", "forget_base_loss", "forget_kl"}`` on the run's held-out text.

    The adapted model's mean loss on ``run.forgetting``'s tokens, the base model's, and the mean
    per-token KL(base || adapted) (`jlora.core.divergence`); floats, or (K,) for a population, whose
    base forward pass is made once for all members. The base is the state's frozen leaves with the
    original values of the leaves the run trains (no copy of the frozen ones).
    """
    run, axes = trainer.run, trainer.axes
    cfg = run.cfg

    def sums(inputs, batch):
        return forgetting_sums(run.model, inputs["adapted"], inputs["base"], batch)

    if axes is not None:
        sums = jax.vmap(sums, in_axes=({"adapted": axes, "base": None}, None))
    eval_step = compile_eval(sums, local_devices(n_devices))
    originals = partition({"params": run.params}, {"params": trainer.mask["params"]})[0]  # what training changes
    originals = replicate(originals, n_devices) if pmapped else originals

    def forgetting(state) -> dict:
        base = combine(originals, {"params": state.frozen["params"]})
        inputs = {"adapted": state.variables, "base": base}
        means = mean_sums(eval_step, inputs, run.forgetting, cfg.batch_size, max_batches=cfg.eval_batches, feed=feed)
        return dict(zip(("forget_loss", "forget_base_loss", "forget_kl"), means, strict=True))

    return forgetting
