"""`jlora train`: a run built from its config, resumed if its directory has a checkpoint, then looped.

    cfg ─build_run─> tokenizer, base (model, params), data ─initial_lora─> {"params", "lora"}
        ─partition(mask)─> TrainState ─resume─> state at the newest checkpoint (or step 0)
    run_hooks(train_steps(step, state, batch_at, ...), [log, evaluation, checkpoint, telemetry, progress])

Everything an update depends on is a function of (config, step): the batch is `batch_at(data,
step)` and the dropout key is ``fold_in(key(adapter seed), step)``. So the same command on the same
RUN_DIR resumes from the newest checkpoint and reproduces an uninterrupted run's losses.

A config with a ``population:`` section trains its members at once through the same loop: the
trainer (`jlora.training.population.population_trainer`) stacks their adapters, and every hook
writes a row per member.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import jax
import numpy as np

from jlora.core.lora_config import effective_lr, scaling
from jlora.core.optim import count_params
from jlora.core.parallel import replicate, shard_batch, unreplicate
from jlora.core.step import TrainState
from jlora.errors import ConfigError
from jlora.training import checkpoint as ckpt
from jlora.training.data import batch_at
from jlora.training.evaluate import exact_match, greedy_predictor, loss_and_perplexity, make_forgetting, mean_loss
from jlora.training.hooks import MetricsLog, Telemetry, member_rows
from jlora.training.loop import Hook, StepInfo, run_hooks, train_steps
from jlora.training.metrics import MetricsWriter
from jlora.training.population import population_meta, population_trainer
from jlora.training.run import Run, Trainer, adapter_of, build_run, check_config_matches, checkpoint_meta, solo_trainer
from jlora.training.run_config import RunConfig, save_run_config
from jlora.tree import restore


def train(cfg: RunConfig, run_dir: str | Path, *, progress: bool = True) -> dict:
    """Run (or resume) training as `cfg` says, in `run_dir`; returns the summary (the last metrics)."""
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    check_config_matches(run_dir, cfg)
    run = build_run(cfg)
    identity = ckpt.base_identity(run.base_name, run.params)
    trainer = population_trainer(run) if cfg.population else solo_trainer(run)
    run, members = trainer.run, trainer.members
    size = None if members is None else len(members)

    run_dir.mkdir(parents=True, exist_ok=True)
    save_run_config(cfg, run_dir / "config.yaml")
    manager = ckpt.open_manager(run_dir, max_to_keep=cfg.checkpoint.max_to_keep)
    state, start = resume(manager, trainer.state, run.params)

    n_devices, n_hosts = jax.local_device_count(), jax.process_count()
    if cfg.batch_size % (n_devices * n_hosts):
        raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by the {n_devices * n_hosts} devices")
    step = trainer.make_step(n_devices)
    feed = partial(feed_devices, n_devices=n_devices, n_hosts=n_hosts) if step.pmapped else (lambda batch: batch)
    n_trainable = count_params(state.trainable)
    telemetry = None
    if cfg.telemetry:  # from the host state: it keeps a copy of the adapters to measure their drift
        telemetry = Telemetry(trainer._replace(state=state), every=cfg.telemetry, pmapped=step.pmapped, start=start)
    if step.pmapped:
        state = replicate(state, n_devices)
    print(header(run, n_trainable, n_devices * n_hosts, start, members))

    writer = MetricsWriter(
        run_dir, truncate_after=start, members=None if members is None else [m.name for m in members]
    )
    evaluate = make_evaluator(trainer, feed, pmapped=step.pmapped, n_devices=n_devices)
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, dynamic_ncols=True, unit="step")

    def evaluation(info: StepInfo) -> None:
        for row in member_rows(info.step, evaluate(info.state), size):
            writer.write(row)
            log.remember(row)
            who = "" if size is None else f" [{members[row['member']].name}]"
            figures = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("step", "member"))
            bar.write(f"step {info.step}{who}: {figures}")

    def checkpoint(info: StepInfo) -> None:
        host = unreplicate(info.state) if step.pmapped else info.state
        meta = {**checkpoint_meta(run, info.step, identity), **population_meta(members)}
        ckpt.save(manager, info.step, adapter_of(host.trainable), host.opt_state, meta)

    log = MetricsLog(
        writer,
        every=cfg.log_every,
        boundary=lambda s: s % cfg.eval_every == 0 or s % cfg.checkpoint.every == 0,
        pmapped=step.pmapped,
        newest_checkpoint=manager.latest_step,
        bar=bar,
        members=size,
    )
    hooks = [
        Hook(log, every=1),
        Hook(evaluation, every=cfg.eval_every),
        Hook(checkpoint, every=cfg.checkpoint.every),
        Hook(lambda info: bar.update(1), every=1),
    ]
    if telemetry is not None:  # before the checkpoint: a checkpoint at step s finds every row up to s written
        hooks.insert(2, Hook(lambda info: [writer.write(row) for row in telemetry(info)], every=cfg.telemetry))
    try:
        if start == 0:
            for row in member_rows(0, evaluate(state), size):
                writer.write(row)
        batch_for = lambda i: feed(batch_at(run.train, i, cfg.batch_size, cfg.seed))  # noqa: E731
        steps = train_steps(step, state, batch_for, trainer.rng, start=start, stop=cfg.steps)
        run_hooks(steps, hooks)
    finally:
        bar.close()
        writer.close()
    summary = summarise(cfg.steps, log.last, members)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def summarise(steps: int, last: dict, members) -> dict:
    """summary.json: the last metrics of the run, or ``{"step", "members": [each member's]}``."""
    if members is None:
        return {"step": steps, **last.get(None, {})}
    return {"step": steps, "members": [{"member": k, "name": m.name, **last.get(k, {})} for k, m in enumerate(members)]}


def resume(manager, state: TrainState, params: dict) -> tuple[TrainState, int]:
    """(state, start step): the newest checkpoint's adapters and optimizer state put into `state`, or step 0."""
    latest = manager.latest_step()
    if latest is None:
        return state, 0
    adapter, opt_state, meta = ckpt.restore(manager, latest, adapter_of(state.trainable), state.opt_state)
    ckpt.check_base(meta["base_model"], params)
    trainable = restore(state.trainable, {"params": adapter.get("base") or {}, "lora": adapter["lora"]})
    return state.replace(trainable=trainable, opt_state=opt_state, step=np.asarray(latest, np.int32)), latest


def header(run: Run, n_trainable: int, n_devices: int, start: int, members=None) -> str:
    """The run's first line: base, scaling and effective learning rate, trainable size, data, devices.

    A population's line gives the member count and total trainable size; a line per member follows
    with its scaling and effective learning rate.
    """
    cfg, lora = run.cfg, run.model.lora
    if members is None:
        adapters = (
            f"LoRA r={lora.r} alpha={lora.alpha} scaling={scaling(lora):g} | "
            f"lr={cfg.optim.lr:g} effective lr (lr*alpha/r)={effective_lr(cfg.optim.lr, lora):g}"
        )
    else:
        adapters = f"population of {len(members)} adapters"
    trainable = f"trainable {n_trainable:,}" + ("" if members is None else " in all")
    line = f"jlora: {run.base_name} | {adapters} | {trainable} | train: {run.train.summary()} | devices {n_devices}" + (
        f" | resuming at step {start}" if start else ""
    )
    for k, m in enumerate(members or ()):
        line += (
            f"\n  member {k} [{m.name}]: r={m.lora.r} alpha={m.lora.alpha:g} scaling={scaling(m.lora):g} "
            f"lr={m.lr:g} effective lr={effective_lr(m.lr, m.lora):g} seed={m.seed}"
        )
    return line


def make_evaluator(trainer: Trainer, feed, *, pmapped: bool, n_devices: int):
    """``evaluate(state) -> {"val_loss", "val_ppl"[, "exact_match"][, "forget_*"]}``: floats, or (K,)
    arrays for a population; {} without validation or forgetting data."""
    run = trainer.run
    cfg = run.cfg
    eval_step = trainer.make_eval_step(n_devices)
    predict = greedy_predictor(run.model, trainer.axes)
    forgetting = (
        None if run.forgetting is None else make_forgetting(trainer, feed, pmapped=pmapped, n_devices=n_devices)
    )

    def evaluate(state: TrainState) -> dict:
        out = {}
        if run.val is not None:
            loss = mean_loss(eval_step, state, run.val, cfg.batch_size, max_batches=cfg.eval_batches, feed=feed)
            out.update(loss_and_perplexity(loss))
            if cfg.exact_match:
                variables = (unreplicate(state) if pmapped else state).variables
                out["exact_match"] = exact_match(predict, variables, run.val, cfg.exact_match, cfg.batch_size)
        if forgetting is not None:
            out.update(forgetting(state))
        return out

    return evaluate


def feed_devices(batch: dict, *, n_devices: int, n_hosts: int) -> dict:
    """This process's rows of a global batch, split over its local devices: (n_devices, rows, T)."""
    if n_hosts > 1:
        batch = {k: np.split(v, n_hosts)[jax.process_index()] for k, v in batch.items()}
    return shard_batch(batch, n_devices)
