"""A run in progress: the members alive now, what the run writes, and the hooks of `jlora train`.

    session = Session(trainer, run_dir, identity, stop=100)        # resumed from the newest checkpoint
    with session:                                                     # closes the progress bar and the log
        session.evaluate_start()                                      # step 0's evaluation (a fresh run)
        last = run_hooks(session.steps(stop_requested), session.hooks())
    session.summary()

A `Session` holds what a run's hooks share and change as it goes: the `Stage` that trains the live
members (all of them, or a search's survivors, staged anew at each rung), the archive of every
member's state a search keeps for its checkpoints, the newest evaluation (what a rung ranks) and
the metrics log. Its hooks are named methods, listed in the order they run after an update:

    log          each update's metrics (`jlora.training.run.hooks.MetricsLog`): first, so a non-finite
                 loss stops the run before a checkpoint could save it
    evaluation   validation loss, perplexity, exact match, forgetting: a row per member
    rung         a search's rung (or its final ranking), after the evaluation it ranks
    telemetry    every N updates, each adapter's spectrum (`jlora.training.run.hooks.Telemetry`)
    checkpoint   the adapters, optimizer state and the run's meta (refused when not finite)
    tick         the progress bar
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from jlora.core.lora.adapter import flatten_adapters, unflatten_adapters
from jlora.core.lora.config import effective_lr, scaling
from jlora.core.update.mesh import Placement, fetch
from jlora.core.update.optim import count_params, partition
from jlora.core.update.population import put_members
from jlora.core.update.step import EvalStep, TrainState, TrainStep
from jlora.errors import NonFiniteError
from jlora.training.data.batching import Layout, describe, run_shapes, shape_batch, shape_bound
from jlora.training.data.rows import batch_at
from jlora.training.records import checkpoint as ckpt
from jlora.training.records.metrics import MetricsWriter, read_metrics
from jlora.training.records.rundir import is_primary
from jlora.training.run.build import Run, Trainer, adapter_of, checkpoint_meta, layout_of, placement_of
from jlora.training.run.evaluate import host_sums, make_evaluator
from jlora.training.run.hooks import MetricsLog, Telemetry, member_rows
from jlora.training.run.loop import Hook, StepInfo, train_steps
from jlora.training.run.population import population_meta, survivors
from jlora.training.run.search import Search, search_steps
from jlora.tree import all_finite, overlay

EVALUATION_KEYS = ("val_loss", "exact_match", "forget_loss")  # an evaluation row has one of these


class Stage(NamedTuple):
    """What trains the members alive now: all of a run's, or a search's survivors between two rungs."""

    trainer: Trainer
    step: TrainStep
    eval_step: EvalStep
    feed: Callable[[dict], dict]  # a host batch -> the batch the step reads (shaped; the step places it)
    evaluate: Callable[[TrainState], dict]
    telemetry: Telemetry | None


class Session:
    """A run from its start (or newest checkpoint) to `stop`: its live stage, records and hooks.

    Attributes:
      run, cfg: what the run is built from (`jlora.training.run.build.Run`) and its config.
      members: the population's members (None: one adapter); `names` theirs.
      search: the successive halving in progress (None: no ``search:`` section).
      live: the `Stage` training the members alive now; `state` its state, placed on its mesh.
      start: the update the run starts from (0, or its newest checkpoint's).
    """

    def __init__(self, trainer: Trainer, run_dir: Path, identity: dict, *, stop: int, progress: bool = True):
        from tqdm.auto import tqdm

        run, cfg = trainer.run, trainer.run.cfg
        self.run, self.cfg, self.identity, self.stop = run, cfg, identity, stop
        self.members = trainer.members
        self.names = None if self.members is None else [m.name for m in self.members]
        self.primary = is_primary()  # process 0 writes the run's records; every process takes part in saves
        self.progress = progress and self.primary
        self.manager = ckpt.open_manager(run_dir, max_to_keep=cfg.checkpoint.max_to_keep)
        state, self.start, meta = resume(self.manager, trainer.state, run, identity)
        logged = [row for row in read_metrics(run_dir) if row["step"] <= self.start] if self.start else []
        self.search = self.archive = None
        if cfg.search:  # the members alive at `start`; every member's state stays in the checkpoints (`archive`)
            self.search = Search.resumed(cfg.search, cfg.steps, len(self.members), meta, self.start, logged)
            self.archive = jax.tree.map(np.asarray, (state.trainable, state.opt_state))
            trainer, state = survivors(trainer, state, self.search.alive)
        self.layout = layout_of(cfg, jax.device_count())
        n_trainable = count_params(state.trainable)
        self.live, self.state = self.stage(trainer, state, self.start)
        if self.primary:
            placement = self.live.step.placement
            print(header(run, n_trainable, placement, self.start, self.layout, self.members, self.search))
        self.writer = MetricsWriter(run_dir, truncate_after=self.start, primary=self.primary, members=self.names)
        self.bar = tqdm(total=stop, initial=self.start, disable=not self.progress, dynamic_ncols=True, unit="step")
        self.evaluated: dict[int, list[dict]] = {}  # the newest evaluation's rows, by step: what a rung decides on
        rungs = set(self.search.rung_steps) if self.search else set()
        self.log = MetricsLog(
            self.writer,
            every=cfg.log_every,
            boundary=lambda s: s % cfg.eval_every == 0 or s % cfg.checkpoint.every == 0 or s in rungs,
            newest_checkpoint=self.manager.latest_step,
            bar=self.bar,
            members=self.live.trainer.ids,
        )
        for row in logged:  # a resumed run's summary holds the figures of members pruned before it resumed
            if "loss" in row or any(key in row for key in EVALUATION_KEYS):
                self.log.remember(row)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        self.writer.close()

    # --- the stage: what trains the live members ----------------------------------------------------

    def stage(self, trainer: Trainer, state: TrainState, start: int) -> tuple[Stage, TrainState]:
        """What trains `trainer`'s members (a search's survivors: built again at each rung, on a mesh for
        their number), and `state` placed on it."""
        cfg = self.cfg
        placement = placement_of(cfg, trainer)
        step, eval_step = trainer.make_step(placement), trainer.make_eval_step(placement)
        telemetry = None
        if cfg.telemetry:  # from the host state: it keeps a copy of the adapters to measure their drift
            telemetry = Telemetry(trainer._replace(state=state), every=cfg.telemetry, start=start)
        evaluate = make_evaluator(trainer, eval_step, layout=self.layout, progress=self.progress)
        feed = lambda batch: shape_batch(batch, self.layout)  # noqa: E731 (host arrays: the steps place them)
        return Stage(trainer, step, eval_step, feed, evaluate, telemetry), step.place(state)

    def restage(self, state: TrainState, step: int) -> tuple:
        """After a rung: the survivors on a stage of their own (the pruned's last state archived)."""
        live = self.live
        if list(self.search.alive) == list(live.trainer.ids):  # nobody pruned (one member left): as it was
            return live.step, state, live.trainer.rng
        host = on_host(state)
        self.archive = put_members(self.archive, (host.trainable, host.opt_state), live.trainer.ids)
        self.live, state = self.stage(*survivors(live.trainer, host, self.search.alive), step)
        self.log.members = self.live.trainer.ids
        return self.live.step, state, self.live.trainer.rng

    def steps(self, stop_requested: Callable[[int], bool] = lambda step: False) -> Iterator[StepInfo]:
        """The updates from `start` to `stop` (a search's: from rung to rung, restaged at each)."""
        cfg, live = self.cfg, self.live
        batch_for = lambda i: self.live.feed(batch_at(self.run.train, i, cfg.batch_size, cfg.seed))  # noqa: E731
        loop = dict(start=self.start, stop=self.stop, stop_requested=stop_requested)
        if self.search is None:
            return train_steps(live.step, self.state, batch_for, live.trainer.rng, **loop)
        loop.update(rungs=self.search.rung_steps, restage=self.restage)
        return search_steps(live.step, self.state, batch_for, live.trainer.rng, **loop)

    # --- the hooks -----------------------------------------------------------------------------------

    def hooks(self) -> list[Hook]:
        """The run's hooks, in the order they run after an update (see the module's doc)."""
        cfg = self.cfg
        hooks = [Hook(self.log, every=1), Hook(self.evaluation, every=cfg.eval_every, at_interrupt=False)]
        if self.search is not None:
            hooks.append(Hook(self.rung, every=cfg.search.rung_every, at_interrupt=False))
        if cfg.telemetry:  # before the checkpoint: a checkpoint at step s finds every row up to s written
            hooks.append(Hook(self.telemetry, every=cfg.telemetry))
        return hooks + [Hook(self.checkpoint, every=cfg.checkpoint.every), Hook(self.tick, every=1)]

    def evaluate_start(self) -> None:
        """A fresh run's evaluation of its untrained adapters (step 0); a resumed run has it."""
        if self.start == 0:
            for row in self.evaluation_rows(0, self.state):
                self.writer.write(row)

    def evaluation_rows(self, step: int, state: TrainState) -> list[dict]:
        result = self.live.evaluate(state)
        return member_rows(step, result, self.live.trainer.ids) if result else []  # {}: no validation or forgetting

    def evaluation(self, info: StepInfo) -> list[dict]:
        """The evaluation after update ``info.step``: written, remembered, shown, kept for a rung."""
        rows = self.evaluation_rows(info.step, info.state)
        for row in rows:
            self.writer.write(row)
            self.log.remember(row)
            who = "" if self.members is None else f" [{self.members[row['member']].name}]"
            figures = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("step", "member"))
            self.bar.write(f"step {info.step}{who}: {figures}")
        self.evaluated = {info.step: rows}
        return rows

    def rung(self, info: StepInfo) -> None:
        """A search's rung (or, at the last step, its final ranking), on this step's evaluation."""
        search = self.search
        last = info.step == self.cfg.steps
        decide = search.rung if search.prunes_at(info.step) else search.finish if last else None
        if decide is not None:
            record = decide(info.step, self.evaluated.get(info.step) or self.evaluation(info))
            self.bar.write(search.describe(record, self.names))

    def telemetry(self, info: StepInfo) -> None:
        for row in self.live.telemetry(info):
            self.writer.write(row)

    def checkpoint(self, info: StepInfo) -> None:
        """The state after ``info.step`` saved (refused when not finite); a search's with every member's."""
        host = on_host(info.state)
        check_finite_state(self.live.eval_step, info, host, newest=self.manager.latest_step())
        meta = {**checkpoint_meta(self.run, info.step, self.identity), **population_meta(self.members)}
        trainable, opt_state = host.trainable, host.opt_state
        if self.search is not None:  # every member, the pruned at their last state: any can be loaded
            trainable, opt_state = put_members(self.archive, (trainable, opt_state), self.live.trainer.ids)
            meta.update(self.search.meta())
        ckpt.save(self.manager, info.step, adapter_of(trainable, self.run.start_leaves, self.run.init), opt_state, meta)

    def tick(self, info: StepInfo) -> None:
        self.bar.update(1)

    def summary(self) -> dict:
        """summary.json: the last metrics of the run (a population's per member; a search's ranking)."""
        summary = summarise(self.stop, self.log.last, self.members)
        if self.search is not None:
            summary["search"] = {**self.search.summary(self.stop), "train_examples": len(self.run.train)}
        return summary


def on_host(state: TrainState) -> TrainState:
    """The state with its trainable part and optimizer state fetched to host numpy (checks and slices
    of them start no program across devices, which XLA:CPU could deadlock on when many are in
    flight; checkpoints of them restore on any number of devices); the frozen base stays placed."""
    return state.replace(trainable=fetch(state.trainable), opt_state=fetch(state.opt_state))


def summarise(steps: int, last: dict, members) -> dict:
    """summary.json: the last metrics of the run, or ``{"step", "members": [each member's]}``."""
    if members is None:
        return {"step": steps, **last.get(None, {})}
    return {"step": steps, "members": [{"member": k, "name": m.name, **last.get(k, {})} for k, m in enumerate(members)]}


def resume(manager, state: TrainState, run: Run, identity: dict) -> tuple[TrainState, int, dict | None]:
    """(state, start step, its checkpoint's meta): `state` as the newest readable checkpoint saved it,
    or as it is at step 0 (meta None).

    The checkpoint's base leaves (trained, or brought by an init_from adapter) go back into
    whichever partition holds them; a damaged newer checkpoint is set aside (`ckpt.restore_newest`).
    `identity` is the original base's (`ckpt.base_identity`; a PiSSA / OLoRA run trains on a
    residual of it).
    """
    like = adapter_of(state.trainable, run.start_leaves, run.init)
    restored = ckpt.restore_newest(manager, like, state.opt_state)
    if restored is None:
        return state, 0, None
    for bad, why, where in restored.set_aside:
        print(f"jlora: checkpoint {bad} cannot be read ({why}); moved to {where}", file=sys.stderr)
    ckpt.check_identity(restored.meta["base_model"], identity)
    saved = flatten_adapters(restored.adapter["lora"])  # the factors; the scales are the adapters' own
    lora = {path: {**adapter, **saved[path]} for path, adapter in flatten_adapters(state.variables["lora"]).items()}
    variables = {
        **state.variables,
        "params": overlay(state.variables["params"], restored.adapter["base"]),
        "lora": unflatten_adapters(lora),
    }
    is_trained = jax.tree.map(lambda x: x is not None, state.trainable, is_leaf=lambda x: x is None)
    trainable, frozen = partition(variables, is_trained)
    step = np.asarray(restored.step, np.int32)
    return TrainState(step, trainable, frozen, restored.opt_state), restored.step, restored.meta


def check_finite_state(eval_step: EvalStep, info: StepInfo, host: TrainState, *, newest: int | None) -> None:
    """Refuse to checkpoint a state that is not finite: a NaN or infinite value, or a non-finite loss.

    The loss of the state (after the update) on the batch it was just trained on catches what the
    values alone do not: adapters of 1e30 are finite numbers, but the model they make is NaN.
    A population's state is refused when any member's is not finite.
    """
    total, count = host_sums(eval_step(info.state, info.batch))
    loss = total / np.maximum(count, 1.0)
    if not (np.isfinite(loss).all() and all_finite(host.trainable) and all_finite(host.opt_state)):
        losses = np.ravel(loss)
        shown = next((x for x in losses if not np.isfinite(x)), losses[0])  # a member's bad loss, if one is
        raise NonFiniteError(
            f"the trained state at step {info.step} is not finite (loss on its last batch: {shown:.4g}); "
            f"stopped without saving it (newest checkpoint: step {newest})"
        )


def header(
    run: Run,
    n_trainable: int,
    placement: Placement,
    start: int,
    layout: Layout,
    members=None,
    search: Search | None = None,
) -> str:
    """The run's first line: base, scaling and effective learning rate, trainable size, data, batch
    shapes (padding and compiled step shapes of the steps to come), devices and their mesh.

    A population's line gives the member count and total trainable size; a line per member follows
    with its scaling and effective learning rate, and a search's line its rungs and who is alive.
    """
    cfg, lora = run.cfg, run.model.lora
    shapes = run_shapes(run.train, cfg.batch_size, cfg.seed, range(start, cfg.steps), layout)
    if members is None:
        adapters = (
            f"LoRA r={lora.r} alpha={lora.alpha} scaling={scaling(lora):g} | "
            f"lr={cfg.optim.lr:g} effective lr (lr*alpha/r)={effective_lr(cfg.optim.lr, lora):g}"
        )
    else:
        adapters = f"population of {len(members)} adapters"
    trainable = f"trainable {n_trainable:,}" + ("" if members is None else " in all")
    line = (
        f"jlora: {run.base_name} | {adapters} | {trainable} | train: {run.train.summary()} | "
        f"{describe(layout, shapes, shape_bound(cfg.seq_len, cfg.batch_size, layout))} | "
        f"{run.model.config.dtype} | devices {placement.size} (mesh {placement.describe()})"
        + (f" | resuming at step {start}" if start else "")
    )
    for k, m in enumerate(members or ()):
        line += (
            f"\n  member {k} [{m.name}]: r={m.lora.r} alpha={m.lora.alpha:g} scaling={scaling(m.lora):g} "
            f"lr={m.lr:g} effective lr={effective_lr(m.lr, m.lora):g} seed={m.seed}"
        )
    if search is not None:
        c = search.cfg
        line += (
            f"\n  search: successive halving by {c.metric}, keeping ceil(n / {c.eta}) at the rungs "
            f"{', '.join(map(str, search.rung_steps))}; {len(search.alive)} of {search.n_members} members alive"
        )
    return line
