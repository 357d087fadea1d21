"""Evaluation on a held-out set: mean loss over answer tokens, perplexity, greedy exact match.

    eval_step = make_eval_step(model)                       # (masked loss sum, token count) of a batch
    mean_loss(eval_step, variables, val_data, batch_size=8, feed=lambda b: shape_batch(b, layout))
    exact_match(greedy_predictor(model), variables, val_data, n=64, batch_size=8, layout=layout)
    make_forgetting(trainer, ...)(state)                    # loss, base loss, KL(base || adapted) on held-out text
    make_evaluator(trainer, eval_step, layout=layout)(state)  # all of them, as a run's evaluation hook computes them

A population's eval step and predictor (`jlora.core.update.population`) give each figure as a (K,)
array, one per member, through the same functions. `mean_loss` and `exact_match` take
``progress``, called after each batch (e.g. a progress bar's ``update``), and `n_batches` says
how many calls to expect: an evaluation of a large model on a CPU can run for minutes, and
should show that it is moving.

Exact match needs no decoding loop: with the true tokens as input, greedy decoding from the
prompt reproduces the completion exactly when every answer position's argmax is right
(`greedy_exact_match`), so one teacher-forced forward pass decides it. Both
run on batches shaped like the training ones (`jlora.training.data.batching`): trimmed to their
content, and the LM head only at the positions that carry loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np

from jlora.core.analysis.divergence import forgetting_sums
from jlora.core.models.gpt2 import GPT2
from jlora.core.update.loss import loss_argmax
from jlora.core.update.mesh import Placement, fetch, mesh_placement, put
from jlora.core.update.optim import combine, partition
from jlora.core.update.step import EvalStep, TrainState, compile_eval, host_inputs, step_inputs
from jlora.training.data.batching import Layout, shape_batch
from jlora.training.data.rows import TokenizedData, eval_batches


def greedy_exact_match(
    predictions: np.ndarray | jax.Array, targets: np.ndarray | jax.Array, loss_mask: np.ndarray | jax.Array
) -> np.ndarray | jax.Array:
    """Per row, whether greedy decoding from the prompt would write exactly the completion (and stop).

    predictions: (N, T) argmax of the logits at each position, with the true tokens as input
    (teacher forcing). If every counted position is predicted right, greedy decoding from the
    prompt reproduces the completion token by token, closing end-of-text included, and
    conversely; so one forward pass gives exact match. Rows with no counted position (eval
    padding) are False. Works on numpy and JAX arrays. Returns (N,) bool.

    >>> t = np.array([[5, 6, 7], [5, 6, 7]]); m = np.array([[0, 1, 1], [0, 1, 1]])
    >>> greedy_exact_match(np.array([[0, 6, 7], [5, 6, 0]]), t, m).tolist()
    [True, False]
    """
    counted = loss_mask > 0
    return ((predictions == targets) | ~counted).all(axis=-1) & counted.any(axis=-1)


def mean_sums(
    eval_step: EvalStep,
    variables,
    data: TokenizedData,
    batch_size: int,
    *,
    max_batches: int | None = None,
    feed: Callable[[dict], dict] | None = None,
    progress: Callable[[], object] | None = None,
) -> list:
    """Each sum `eval_step` returns but the last, divided by the last (the token count), over `data`.

    The evaluation batches (the first `max_batches`) are added up first and divided once. Each
    mean is a float, or a (K,) array from a population's eval step. `feed` shapes a host batch
    (the eval step places it); `progress()` is called after each batch.
    """
    totals = None
    for i, batch in enumerate(eval_batches(data, batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        sums = host_sums(eval_step(variables, batch if feed is None else feed(batch)))
        totals = sums if totals is None else [t + x for t, x in zip(totals, sums, strict=True)]
        if progress is not None:
            progress()
    *numerators, count = totals
    means = [x / np.maximum(count, 1.0) for x in numerators]
    return [float(m) if m.ndim == 0 else m for m in means]


def host_sums(sums) -> list[np.ndarray]:
    """An eval step's sums as float64 host arrays (`fetch`): scalars, or (K,) for a population."""
    return [np.asarray(x, np.float64) for x in fetch(list(sums))]


def mean_loss(eval_step: EvalStep, variables, data: TokenizedData, batch_size: int, **options) -> float | np.ndarray:
    """Mean masked loss over `data`'s evaluation batches, divided once: `mean_sums`' first mean.

    `eval_step` is a `make_eval_step` ((K,) losses from a population's); `options` are `mean_sums`'
    (`max_batches`, `feed`: e.g. shape a host batch, `progress`).
    """
    return mean_sums(eval_step, variables, data, batch_size, **options)[0]


def n_batches(n_rows: int, batch_size: int, max_batches: int | None = None) -> int:
    """Batches `mean_loss` (with `max_batches`) or `exact_match` (of `n_rows` rows) runs.

    >>> n_batches(200, 8), n_batches(200, 8, max_batches=4), n_batches(60, 8)
    (25, 4, 8)
    """
    batches = -(-n_rows // batch_size)
    return batches if max_batches is None else min(batches, max_batches)


def loss_and_perplexity(loss: float | np.ndarray) -> dict:
    """{"val_loss", "val_ppl"}; the perplexity is capped at e^50 rather than overflowing."""
    ppl = np.exp(np.minimum(loss, 50.0))
    return {"val_loss": loss, "val_ppl": float(ppl) if np.ndim(ppl) == 0 else ppl}


def greedy_predictor(model: GPT2, axes=None, *, placement: Placement | None = None) -> Callable:
    """``predict(variables, batch) -> (R, K)`` greedy next token at each of a shaped batch's loss positions,
    host numpy.

    jit-compiled over `placement`'s mesh as an eval step (None: this process's first device), the batch's
    rows split; the LM head runs at the K loss positions of each row only (`jlora.core.update.loss.loss_argmax`).
    With `axes` (a population's, `jlora.core.update.population.member_axes`): (members, R, K), one per member.
    """
    if placement is None:
        placement = mesh_placement(devices=1)
    predict = lambda variables, batch: loss_argmax(model, variables, batch)  # noqa: E731
    if axes is not None:
        predict = jax.vmap(predict, in_axes=(axes, None))
    cache = {}

    def predictions(variables, batch) -> np.ndarray:
        batch, _ = host_inputs(placement, batch)
        key = jax.tree.structure((variables, batch))
        if key not in cache:
            placed = placement.tree_shardings(variables, False if axes is None else axes)
            cache[key] = jax.jit(predict, in_shardings=(placed, placement.rows), out_shardings=placement.whole), placed
        compiled, placed = cache[key]
        return fetch(compiled(put(variables, placed), batch))

    return predictions


def exact_match(
    predict: Callable,
    variables: dict,
    data: TokenizedData,
    n: int,
    batch_size: int,
    *,
    layout: Layout | None = None,
    progress: Callable[[], object] | None = None,
) -> float | np.ndarray:
    """Fraction of the first `n` rows whose completion greedy decoding reproduces exactly.

    `predict` is a `greedy_predictor`; one teacher-forced forward pass per batch decides it, on
    batches trimmed as `layout` says (rows are never packed here: each row is one answer).
    A population's predictor gives (K,) fractions, one per member. `progress()` is called after
    each batch.
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
        ok = greedy_exact_match(predictions, at["targets"], at["loss_mask"])[..., :take]
        real = batch["loss_mask"][:take].any(axis=-1)
        hits, rows = hits + ok[..., real].sum(axis=-1), rows + int(real.sum())
        if progress is not None:
            progress()
    fraction = np.asarray(hits, np.float64) / max(rows, 1)
    return float(fraction) if fraction.ndim == 0 else fraction


def make_forgetting(trainer, feed: Callable[[dict], dict], *, placement: Placement) -> Callable:
    """``forgetting(state) -> {"forget_loss", "forget_base_loss", "forget_kl"}`` on the run's held-out text.

    The adapted model's mean loss on ``run.forgetting``'s tokens, the base model's, and the mean
    per-token KL(base || adapted) (`jlora.core.analysis.divergence`); floats, or (K,) for a population, whose
    base forward pass is made once for all members. The base is the state's frozen leaves with the
    original values of the leaves the run trains (no copy of the frozen ones). `feed` shapes a host batch;
    the evaluation runs on `placement`'s mesh (the run's eval step's).
    """
    run, axes = trainer.run, trainer.axes
    cfg = run.cfg

    def sums(inputs, batch):
        return forgetting_sums(run.model, inputs["adapted"], inputs["base"], batch)

    if axes is not None:
        sums = jax.vmap(sums, in_axes=({"adapted": axes, "base": None}, None))

    def shardings(inputs):
        adapted = placement.tree_shardings(inputs["adapted"], False if axes is None else axes)
        return {"adapted": adapted, "base": placement.tree_shardings(inputs["base"])}

    eval_step = compile_eval(sums, placement, shardings)
    originals = partition({"params": run.params}, {"params": trainer.mask["params"]})[0]  # what training changes
    originals = put(originals, placement.tree_shardings(originals))

    def forgetting(state, progress: Callable[[], object] | None = None) -> dict:
        base = combine(originals, {"params": state.frozen["params"]})
        inputs = {"adapted": state.variables, "base": base}
        means = mean_sums(
            eval_step,
            inputs,
            run.forgetting,
            cfg.batch_size,
            max_batches=cfg.eval_batches,
            feed=feed,
            progress=progress,
        )
        return dict(zip(("forget_loss", "forget_base_loss", "forget_kl"), means, strict=True))

    return forgetting


def make_evaluator(trainer, eval_step: EvalStep, *, layout: Layout, progress: bool = False):
    """``evaluate(state) -> {"val_loss", "val_ppl"[, "exact_match"][, "forget_*"]}``: floats, or (K,)
    arrays for a population; {} without validation or forgetting data.

    Batches are shaped by `layout` and placed on the eval step's mesh; forgetting's text is never packed
    (its forward passes read plain rows). With `progress`, a bar counts the evaluation's batches (and is
    cleared when it ends).
    """
    from tqdm.auto import tqdm

    run = trainer.run
    cfg, placement = run.cfg, eval_step.placement
    predict = greedy_predictor(run.model, trainer.axes, placement=placement)
    feed = lambda batch: shape_batch(batch, layout)  # noqa: E731
    forgetting = None
    if run.forgetting is not None:
        rows = dataclasses.replace(layout, pack=False)
        forgetting = make_forgetting(trainer, lambda batch: shape_batch(batch, rows), placement=placement)

    def evaluate(state: TrainState) -> dict:
        total = 0
        if run.val is not None:
            total += n_batches(len(run.val), cfg.batch_size, cfg.eval_batches)
            total += n_batches(min(cfg.exact_match, len(run.val)), cfg.batch_size)
        if forgetting is not None:
            total += n_batches(len(run.forgetting), cfg.batch_size, cfg.eval_batches)
        out = {}
        with tqdm(total=total, desc="evaluating", unit="batch", leave=False, disable=not progress) as bar:
            if run.val is not None:
                loss = mean_loss(
                    eval_step,
                    state,
                    run.val,
                    cfg.batch_size,
                    max_batches=cfg.eval_batches,
                    feed=feed,
                    progress=bar.update,
                )
                out.update(loss_and_perplexity(loss))
                if cfg.exact_match:
                    out["exact_match"] = exact_match(
                        predict,
                        state.variables,
                        run.val,
                        cfg.exact_match,
                        cfg.batch_size,
                        layout=layout,
                        progress=bar.update,
                    )
            if forgetting is not None:
                out.update(forgetting(state, progress=bar.update))
        return out

    return evaluate
