"""`jlora train`: a run built from its config, resumed if its directory has a checkpoint, then looped.

    cfg ─build_run─> tokenizer, base (model, params), data ─initial_lora─> {"params", "lora"}
        ─partition(mask)─> TrainState ─resume─> state at the newest checkpoint (or step 0)
    run_hooks(train_steps(step, state, batch_at, ...), [log, evaluation, telemetry, checkpoint, progress])

Everything an update depends on is a function of (config, step): the batch is `batch_at(data,
step)` and the dropout key is ``fold_in(key(adapter seed), step)``. So the same command on the same
RUN_DIR resumes from the newest checkpoint and reproduces an uninterrupted run's losses.

A config with a ``population:`` section trains its members at once through the same loop: the
trainer (`jlora.training.run.population.population_trainer`) stacks their adapters, and every hook
writes a row per member. With a ``search:`` section too (`jlora.training.run.search`) the loop runs
from rung to rung: a rung hook decides who goes on, and the population shrinks to its survivors.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
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
from jlora.errors import ConfigError, Interrupted, NonFiniteError
from jlora.training.data.batching import Layout, describe, run_shapes, shape_batch, shape_bound
from jlora.training.data.rows import batch_at
from jlora.training.records import checkpoint as ckpt
from jlora.training.records.metrics import MetricsWriter, read_metrics
from jlora.training.records.rundir import check_run_dir, hold_run_dir, is_primary
from jlora.training.run.build import (
    Run,
    Trainer,
    adapter_of,
    build_run,
    check_config_matches,
    checkpoint_meta,
    layout_of,
    placement_of,
    solo_trainer,
)
from jlora.training.run.config import RunConfig, save_run_config
from jlora.training.run.evaluate import (
    exact_match,
    greedy_predictor,
    host_sums,
    loss_and_perplexity,
    make_forgetting,
    mean_loss,
    n_batches,
)
from jlora.training.run.hooks import MetricsLog, Telemetry, member_rows
from jlora.training.run.interrupt import stop_requests
from jlora.training.run.loop import Hook, StepInfo, run_hooks, train_steps
from jlora.training.run.population import population_meta, population_trainer, survivors
from jlora.training.run.search import Search, search_steps
from jlora.tree import all_finite, overlay

EVALUATION_KEYS = ("val_loss", "exact_match", "forget_loss")  # an evaluation row has one of these


def train(cfg: RunConfig, run_dir: str | Path, *, progress: bool = True, until: int | None = None) -> dict:
    """Run (or resume) training as `cfg` says, in `run_dir`; returns the summary (the last metrics).

    Input errors are raised before anything is written; a run stopped by SIGINT or SIGTERM saves
    a checkpoint at the update it reached and raises `Interrupted`. `until` stops after that update
    (checkpointed there; the learning-rate schedule stays the one of ``cfg.steps``), as a scheduler
    pausing a trial does: the same call with a later `until`, or none, goes on from there.
    """
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    check_run_dir(run_dir)  # a bad --out costs a line, not a model load
    check_config_matches(run_dir, cfg)
    stop = cfg.steps if until is None else until
    if not 1 <= stop <= cfg.steps:
        raise ConfigError(f"until={until} must be in 1..{cfg.steps} (the run's steps)")
    run = build_run(cfg)
    n_devices = jax.device_count()  # every process's
    if cfg.batch_size % n_devices:
        raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by the {n_devices} devices")
    identity = ckpt.base_identity(run.base_name, run.params)  # the original base, also under PiSSA / OLoRA
    # PiSSA / OLoRA / LoRA-GA: the residual it trained on; EVA: its ranks (neither reads a batch again)
    init = ckpt.find_init(run_dir) if cfg.lora.changes_base or cfg.lora.from_data else None
    trainer = population_trainer(run) if cfg.population else solo_trainer(run, init)
    run, members = trainer.run, trainer.members
    placement_of(cfg, trainer).tree_shardings(run.params)  # a base weight fsdp cannot split: one line, now

    with hold_run_dir(run_dir), stop_requests(every=cfg.log_every) as stop_requested:
        check_config_matches(run_dir, cfg)  # again: now no other run can write the folder
        primary = is_primary()  # process 0 writes the run's records; every process takes part in saves
        if primary:
            save_run_config(cfg, run_dir / "config.yaml")
        manager = ckpt.open_manager(run_dir, max_to_keep=cfg.checkpoint.max_to_keep)
        state, start, meta = resume(manager, trainer.state, run, identity)
        logged = [row for row in read_metrics(run_dir) if row["step"] <= start] if start else []  # kept on resume
        search = archive = None
        if cfg.search:  # the members alive at `start`; every member's state stays in the checkpoints (`archive`)
            search = Search.resumed(cfg.search, cfg.steps, len(members), meta, start, logged)
            archive = jax.tree.map(np.asarray, (state.trainable, state.opt_state))
            trainer, state = survivors(trainer, state, search.alive)
        layout = layout_of(cfg, n_devices)
        n_trainable = count_params(state.trainable)

        def stage(trainer: Trainer, state: TrainState, start: int) -> tuple[Stage, TrainState]:
            """What trains the live members (a search's survivors: built again at each rung, on a mesh for
            their number), and `state` placed on it."""
            placement = placement_of(cfg, trainer)
            step, eval_step = trainer.make_step(placement), trainer.make_eval_step(placement)
            telemetry = None
            if cfg.telemetry:  # from the host state: it keeps a copy of the adapters to measure their drift
                telemetry = Telemetry(trainer._replace(state=state), every=cfg.telemetry, start=start)
            evaluate = make_evaluator(trainer, eval_step, layout=layout, progress=progress and primary)
            feed = lambda batch: shape_batch(batch, layout)  # noqa: E731 (host arrays: the steps place them)
            return Stage(trainer, step, eval_step, feed, evaluate, telemetry), step.place(state)

        live, state = stage(trainer, state, start)
        if primary:
            print(header(run, n_trainable, live.step.placement, start, layout, members, search))

        names = None if members is None else [m.name for m in members]
        writer = MetricsWriter(run_dir, truncate_after=start, primary=primary, members=names)
        bar = tqdm(total=stop, initial=start, disable=not (progress and primary), dynamic_ncols=True, unit="step")
        evaluated: dict[int, list[dict]] = {}  # the newest evaluation's rows, by step: what a rung decides on

        def on_host(state: TrainState) -> TrainState:
            """The state with its trainable part and optimizer state fetched to host numpy (checks and slices
            of them start no program across devices, which XLA:CPU could deadlock on when many are in
            flight; checkpoints of them restore on any number of devices); the frozen base stays placed."""
            return state.replace(trainable=fetch(state.trainable), opt_state=fetch(state.opt_state))

        def evaluation_rows(step: int, state: TrainState) -> list[dict]:
            result = live.evaluate(state)
            return member_rows(step, result, live.trainer.ids) if result else []  # {}: no validation or forgetting

        def evaluation(info: StepInfo) -> list[dict]:
            rows = evaluation_rows(info.step, info.state)
            for row in rows:
                writer.write(row)
                log.remember(row)
                who = "" if members is None else f" [{members[row['member']].name}]"
                figures = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("step", "member"))
                bar.write(f"step {info.step}{who}: {figures}")
            evaluated.clear()
            evaluated[info.step] = rows
            return rows

        def rung(info: StepInfo) -> None:  # a search's rung (or, at the last step, its final ranking)
            decide = search.rung if search.prunes_at(info.step) else search.finish if info.step == cfg.steps else None
            if decide is not None:
                record = decide(info.step, evaluated.get(info.step) or evaluation(info))
                bar.write(search.describe(record, names))

        def restage(state: TrainState, step: int) -> tuple:  # after a rung: the survivors, on their own
            nonlocal live, archive
            if list(search.alive) == list(live.trainer.ids):  # nobody pruned (one member left): as it was
                return live.step, state, live.trainer.rng
            host = on_host(state)
            archive = put_members(archive, (host.trainable, host.opt_state), live.trainer.ids)  # the pruned's last
            live, state = stage(*survivors(live.trainer, host, search.alive), step)
            log.members = live.trainer.ids
            return live.step, state, live.trainer.rng

        def checkpoint(info: StepInfo) -> None:
            host = on_host(info.state)
            check_finite_state(live.eval_step, info, host, newest=manager.latest_step())
            meta = {**checkpoint_meta(run, info.step, identity), **population_meta(members)}
            trainable, opt_state = host.trainable, host.opt_state
            if search is not None:  # every member, the pruned at their last state: any can be loaded
                trainable, opt_state = put_members(archive, (trainable, opt_state), live.trainer.ids)
                meta.update(search.meta())
            ckpt.save(manager, info.step, adapter_of(trainable, run.start_leaves, run.init), opt_state, meta)

        rungs = set(search.rung_steps) if search else set()
        log = MetricsLog(
            writer,
            every=cfg.log_every,
            boundary=lambda s: s % cfg.eval_every == 0 or s % cfg.checkpoint.every == 0 or s in rungs,
            newest_checkpoint=manager.latest_step,
            bar=bar,
            members=live.trainer.ids,
        )
        for row in logged:  # a resumed run's summary holds the figures of members pruned before it resumed
            if "loss" in row or any(key in row for key in EVALUATION_KEYS):
                log.remember(row)
        hooks = [
            Hook(log, every=1),
            Hook(evaluation, every=cfg.eval_every, at_interrupt=False),
            Hook(checkpoint, every=cfg.checkpoint.every),
            Hook(lambda info: bar.update(1), every=1),
        ]
        if cfg.telemetry:  # before the checkpoint: a checkpoint at step s finds every row up to s written
            hooks.insert(2, Hook(lambda info: [writer.write(row) for row in live.telemetry(info)], every=cfg.telemetry))
        if search is not None:  # after the evaluation (whose rows it ranks), before the checkpoint (which records it)
            hooks.insert(2, Hook(rung, every=cfg.search.rung_every, at_interrupt=False))
        try:
            for row in evaluation_rows(0, state) if start == 0 else ():
                writer.write(row)
            batch_for = lambda i: live.feed(batch_at(run.train, i, cfg.batch_size, cfg.seed))  # noqa: E731
            loop = dict(start=start, stop=stop, stop_requested=stop_requested)
            if search is None:
                steps = train_steps(live.step, state, batch_for, live.trainer.rng, **loop)
            else:
                steps = search_steps(
                    live.step, state, batch_for, live.trainer.rng, rungs=search.rung_steps, restage=restage, **loop
                )
            last = run_hooks(steps, hooks)
        finally:
            bar.close()
            writer.close()
        if last is not None and last.interrupted:
            raise Interrupted(f"interrupted at step {last.step}; saved a checkpoint there, the same command resumes it")
        summary = summarise(stop, log.last, members)
        if search is not None:
            summary["search"] = {**search.summary(stop), "train_examples": len(run.train)}
        if primary:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


class Stage(NamedTuple):
    """What trains the members alive now: all of a run's, or a search's survivors between two rungs."""

    trainer: Trainer
    step: TrainStep
    eval_step: EvalStep
    feed: Callable[[dict], dict]  # a host batch -> the batch the step reads (shaped; the step places it)
    evaluate: Callable[[TrainState], dict]
    telemetry: Telemetry | None


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


def make_evaluator(trainer: Trainer, eval_step: EvalStep, *, layout: Layout, progress: bool = False):
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
