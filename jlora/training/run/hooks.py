"""The hooks of `jlora train`: what a run does between updates besides updating.

    MetricsLog   each update's metrics, fetched in windows: metrics.jsonl, TensorBoard, progress bar
    Telemetry    every N updates, the spectrum of each adapter's dW and its drift (jlora.core.analysis.telemetry)
    evaluation   validation loss, perplexity and exact match            (`Session.evaluation`)
    checkpoint   the adapter and optimizer state, with the run's meta  (`Session.checkpoint`)

A population's step gives every metric with a member axis (K,); `member_rows` turns such values
into one row per member, each with its ``member`` index (its place in the run's population, which a
search's survivors keep as the population shrinks), and the hooks write those.

Each is called by `jlora.training.run.loop.run_hooks` with a `StepInfo`; they run in the order the
run lists them, so the log (which stops a run whose loss is not finite) runs before a
checkpoint could save a bad state.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from jlora.core.analysis.telemetry import adapter_figures, telemetry_row, weight_norms
from jlora.core.lora.adapter import flatten_adapters
from jlora.core.update.mesh import fetch
from jlora.core.update.optim import combine
from jlora.core.update.population import take
from jlora.errors import NonFiniteError
from jlora.training.records.metrics import MetricsWriter
from jlora.training.run.build import Trainer
from jlora.training.run.loop import StepInfo


class MetricsLog:
    """Keeps each update's metrics on the device and writes them every `every` updates.

    Fetching once per window keeps the host from waiting on each step. The window is also
    written at every `boundary(step)` (an evaluation, a checkpoint, a search's rung), so rows stay in
    step order and a non-finite loss is caught before a checkpoint. `members` are the indices of the
    members the step's metrics come from (None: a single adapter); a search sets them anew when it
    shrinks. `last` holds the newest figures of each member (key None for a single adapter),
    evaluations' included (`remember`).
    """

    def __init__(
        self,
        writer: MetricsWriter,
        *,
        every: int,
        boundary: Callable[[int], bool],
        newest_checkpoint: Callable[[], int | None],
        bar=None,
        members: Sequence[int] | None = None,
    ):
        self.writer, self.every, self.boundary = writer, every, boundary
        self.newest_checkpoint, self.bar, self.members = newest_checkpoint, bar, members
        self.pending: list[tuple[int, dict]] = []
        self.tokens, self.clock = 0, time.perf_counter()
        self.last: dict[int | None, dict] = {}

    def __call__(self, info: StepInfo) -> None:
        self.pending.append((info.step, info.metrics))
        batch = info.batch  # tokens/s counts real tokens, not the padding a batch is computed with
        tokens = int(np.sum(batch["attention_mask"]) if "attention_mask" in batch else batch["input_ids"].size)
        self.tokens += tokens * (len(self.members) if self.members else 1)  # each member reads the batch
        if info.step % self.every == 0 or self.boundary(info.step) or info.last:
            self.flush()

    def flush(self) -> None:
        rows = fetch_rows(self.pending, self.members)
        self.pending = []
        for row in rows:
            if not math.isfinite(row["loss"]):
                who = "" if "member" not in row else f" of population member {row['member']}"
                raise NonFiniteError(
                    f"loss{who} is {row['loss']} at step {row['step']}; stopped without saving this state "
                    f"(newest checkpoint: step {self.newest_checkpoint()})"
                )
        newest = [row for row in rows if row["step"] == rows[-1]["step"]]
        for row in newest:
            row["tokens_per_s"] = self.tokens / (time.perf_counter() - self.clock)
        for row in rows:
            self.writer.write(row)
            self.remember(row)
        if self.bar is not None:
            loss = float(np.mean([row["loss"] for row in newest]))
            self.bar.set_postfix(
                loss=f"{loss:.4f}", lr=f"{newest[-1]['lr']:.2e}", tok_s=f"{newest[-1]['tokens_per_s']:.0f}"
            )
        self.tokens, self.clock = 0, time.perf_counter()

    def remember(self, row: dict) -> None:
        """Keep a row's figures as its member's newest."""
        member = row.get("member")
        self.last[member] = {**self.last.get(member, {}), **{k: v for k, v in row.items() if k != "member"}}


def member_rows(step: int, values: dict, members: Sequence[int] | None) -> list[dict]:
    """Rows {"step", ["member"], name: float} from host values: floats, or (K,) arrays for the K members
    whose indices `members` lists (value i is member ``members[i]``'s).

    >>> member_rows(5, {"loss": np.array([2.0, 3.0])}, members=[1, 4])
    [{'step': 5, 'member': 1, 'loss': 2.0}, {'step': 5, 'member': 4, 'loss': 3.0}]
    """
    if members is None:
        return [{"step": step, **{k: float(v) for k, v in values.items()}}]
    return [{"step": step, "member": k, **{n: float(v[i]) for n, v in values.items()}} for i, k in enumerate(members)]


def fetch_rows(pending: list[tuple[int, dict]], members: Sequence[int] | None = None) -> list[dict]:
    """Device metrics -> host rows {"step", ["member"], "loss", ...} (one transfer for the whole window)."""
    values = fetch([m for _, m in pending])
    rows = []
    for (step, _), m in zip(pending, values, strict=True):
        rows.extend(member_rows(step, {k: np.asarray(v) for k, v in m.items()}, members))
    return rows


class Telemetry:
    """Every `every` updates: the figures of each adapter's update (`jlora.core.analysis.telemetry`), a row per member.

    The figures are computed by one compiled call on this process's device from the factors, fetched
    from the mesh (small: the adapters alone); phi compares with the adapters `every` updates earlier
    (left out of the first row, and of a row whose previous look was not exactly `every` updates before,
    as after a resume between two looks).
    """

    def __init__(self, trainer: Trainer, *, every: int, start: int):
        self.every = every
        state, run = trainer.state, trainer.run
        self.members = trainer.ids if trainer.members is not None else None
        adapters = flatten_adapters(state.trainable["lora"])
        self.norms = weight_norms(run.params, adapters)
        if trainer.members is None:
            self.ranks = [{p: a["A"].shape[0] for p, a in adapters.items()}]
            self.figures = adapter_figures
        else:
            self.ranks = [{p: m.lora.rank_for(p) for p in adapters} for m in trainer.members]
            self.figures = jax.jit(jax.vmap(adapter_figures, in_axes=(0, 0, None)))
        self.previous = (start, fetch(state.trainable["lora"]))

    def __call__(self, info: StepInfo) -> list[dict]:
        """The rows of this update: {"step", ["member"], "effective_rank/mean", ...}, one per member."""
        lora, scales = fetch((info.state.trainable["lora"], info.state.frozen["lora"]))
        figures = self.figures(combine(lora, scales), self.previous[1], self.norms)
        with_phi = self.previous[0] == info.step - self.every
        rows = []
        for k, ranks in enumerate(self.ranks):
            member = figures if self.members is None else take(figures, k)
            row = telemetry_row(member, ranks, with_phi=with_phi)
            rows.append({"step": info.step, **({} if self.members is None else {"member": self.members[k]}), **row})
        self.previous = (info.step, lora)  # host arrays: the next update's donation leaves them be
        return rows
