"""`jlora train`: a run built from its config, resumed if its directory has a checkpoint, then looped.

    cfg ─build_run─> tokenizer, base (model, params), data ─initial_lora─> {"params", "lora"}
        ─partition(mask)─> TrainState ─resume─> state at the newest checkpoint (or step 0)
    run_hooks(train_steps(step, state, batch_at, ...), [log, evaluation, checkpoint, progress])

Everything an update depends on is a function of (config, step): the batch is `batch_at(data,
step)` and the dropout key is ``fold_in(key(seed), step)``. So the same command on the same
RUN_DIR resumes from the newest checkpoint and reproduces an uninterrupted run's losses.
"""

from __future__ import annotations

import json
import math
import sys
from functools import partial
from pathlib import Path

import jax
import numpy as np

from jlora.core.lora_config import effective_lr, scaling
from jlora.core.optim import count_params, make_optimizer, partition, trainable_mask
from jlora.core.parallel import replicate, shard_batch, unreplicate
from jlora.core.step import EvalStep, TrainState, init_state, make_eval_step, make_train_step
from jlora.errors import ConfigError, Interrupted, NonFiniteError
from jlora.training import checkpoint as ckpt
from jlora.training.batching import Layout, describe, layout_of, run_shapes, shape_batch, shape_bound
from jlora.training.data import batch_at
from jlora.training.evaluate import exact_match, greedy_predictor, loss_and_perplexity, mean_loss, n_batches
from jlora.training.hooks import MetricsLog
from jlora.training.interrupt import stop_requests
from jlora.training.loop import Hook, StepInfo, run_hooks, train_steps
from jlora.training.metrics import MetricsWriter
from jlora.training.run import Run, adapter_of, build_run, check_config_matches, checkpoint_meta, initial_lora
from jlora.training.run_config import RunConfig, save_run_config
from jlora.training.rundir import check_run_dir, hold_run_dir, is_primary
from jlora.tree import all_finite, overlay


def train(cfg: RunConfig, run_dir: str | Path, *, progress: bool = True) -> dict:
    """Run (or resume) training as `cfg` says, in `run_dir`; returns the last metrics.

    Input errors are raised before anything is written; a run stopped by SIGINT or SIGTERM saves
    a checkpoint at the update it reached and raises `Interrupted`.
    """
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    check_run_dir(run_dir)  # a bad --out costs a line, not a model load
    check_config_matches(run_dir, cfg)
    run = build_run(cfg)
    n_devices, n_hosts = jax.local_device_count(), jax.process_count()
    if cfg.batch_size % (n_devices * n_hosts):
        raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by the {n_devices * n_hosts} devices")
    identity = ckpt.base_identity(run.base_name, run.params)
    run, lora = initial_lora(run)
    variables = {"params": run.start_params, "lora": lora}
    mask = trainable_mask(variables, bias=cfg.trainable.bias, modules_to_save=cfg.trainable.modules_to_save)
    optimizer = make_optimizer(cfg.optim, partition(variables, mask)[0])
    state = init_state(variables, mask, optimizer)

    with hold_run_dir(run_dir), stop_requests(every=cfg.log_every) as stop_requested:
        check_config_matches(run_dir, cfg)  # again: now no other run can write the folder
        primary = is_primary()  # process 0 writes the run's records; every process takes part in saves
        if primary:
            save_run_config(cfg, run_dir / "config.yaml")
        manager = ckpt.open_manager(run_dir, max_to_keep=cfg.checkpoint.max_to_keep)
        state, start = resume(manager, state, run)

        step = make_train_step(run.model, optimizer, cfg.optim, n_devices=n_devices)
        eval_step = make_eval_step(run.model, n_devices=n_devices)
        place = partial(feed_devices, n_devices=n_devices, n_hosts=n_hosts) if step.pmapped else (lambda batch: batch)
        layout = layout_of(cfg, n_devices * n_hosts)
        feed = lambda batch: place(shape_batch(batch, layout))  # noqa: E731
        n_trainable = count_params(state.trainable)
        if step.pmapped:
            state = replicate(state, n_devices)
        if primary:
            print(header(run, n_trainable, n_devices * n_hosts, start, layout))

        writer = MetricsWriter(run_dir, truncate_after=start, primary=primary)
        evaluate = make_evaluator(
            run, eval_step, feed, pmapped=step.pmapped, layout=layout, progress=progress and primary
        )
        bar = tqdm(total=cfg.steps, initial=start, disable=not (progress and primary), dynamic_ncols=True, unit="step")

        def evaluation(info: StepInfo) -> None:
            result = evaluate(info.state)
            if not result:  # no validation data
                return
            writer.write({"step": info.step, **result})
            log.last = {**log.last, **result}
            bar.write(f"step {info.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))

        def checkpoint(info: StepInfo) -> None:
            host = unreplicate(info.state) if step.pmapped else info.state
            check_finite_state(eval_step, info, host, newest=manager.latest_step())
            meta = checkpoint_meta(run, info.step, identity)
            ckpt.save(manager, info.step, adapter_of(host.trainable, run.start_leaves), host.opt_state, meta)

        log = MetricsLog(
            writer,
            every=cfg.log_every,
            boundary=lambda s: s % cfg.eval_every == 0 or s % cfg.checkpoint.every == 0,
            pmapped=step.pmapped,
            newest_checkpoint=manager.latest_step,
            bar=bar,
        )
        hooks = [
            Hook(log, every=1),
            Hook(evaluation, every=cfg.eval_every, at_interrupt=False),
            Hook(checkpoint, every=cfg.checkpoint.every),
            Hook(lambda info: bar.update(1), every=1),
        ]
        try:
            if start == 0 and run.val is not None:
                writer.write({"step": 0, **evaluate(state)})
            batch_for = lambda i: feed(batch_at(run.train, i, cfg.batch_size, cfg.seed))  # noqa: E731
            rng = jax.random.key(cfg.seed)
            steps = train_steps(step, state, batch_for, rng, start=start, stop=cfg.steps, stop_requested=stop_requested)
            last = run_hooks(steps, hooks)
        finally:
            bar.close()
            writer.close()
        if last is not None and last.interrupted:
            raise Interrupted(f"interrupted at step {last.step}; saved a checkpoint there, the same command resumes it")
        if primary:
            (run_dir / "summary.json").write_text(json.dumps({"step": cfg.steps, **log.last}, indent=2) + "\n")
    return log.last


def resume(manager, state: TrainState, run: Run) -> tuple[TrainState, int]:
    """(state, start step): `state` as the newest readable checkpoint saved it, or as it is at step 0.

    The checkpoint's base leaves (trained, or brought by an init_from adapter) go back into
    whichever partition holds them; a damaged newer checkpoint is set aside (`ckpt.restore_newest`).
    """
    restored = ckpt.restore_newest(manager, adapter_of(state.trainable, run.start_leaves), state.opt_state)
    if restored is None:
        return state, 0
    for bad, why, where in restored.set_aside:
        print(f"jlora: checkpoint {bad} cannot be read ({why}); moved to {where}", file=sys.stderr)
    ckpt.check_base(restored.meta["base_model"], run.params)
    variables = {
        "params": overlay(state.variables["params"], restored.adapter["base"]),
        "lora": restored.adapter["lora"],
    }
    is_trained = jax.tree.map(lambda x: x is not None, state.trainable, is_leaf=lambda x: x is None)
    trainable, frozen = partition(variables, is_trained)
    step = np.asarray(restored.step, np.int32)
    return TrainState(step, trainable, frozen, restored.opt_state), restored.step


def check_finite_state(eval_step: EvalStep, info: StepInfo, host: TrainState, *, newest: int | None) -> None:
    """Refuse to checkpoint a state that is not finite: a NaN or infinite value, or a non-finite loss.

    The loss of the state (after the update) on the batch it was just trained on catches what the
    values alone do not: adapters of 1e30 are finite numbers, but the model they make is NaN.
    """
    total, count = (float(np.asarray(x).reshape(-1)[0]) for x in eval_step(info.state, info.batch))
    loss = total / max(count, 1.0)
    if not (math.isfinite(loss) and all_finite(host.trainable) and all_finite(host.opt_state)):
        raise NonFiniteError(
            f"the trained state at step {info.step} is not finite (loss on its last batch: {loss:.4g}); "
            f"stopped without saving it (newest checkpoint: step {newest})"
        )


def header(run: Run, n_trainable: int, n_devices: int, start: int, layout: Layout) -> str:
    """The run's first line: base, scaling and effective learning rate, trainable size, data, batch
    shapes (padding and compiled step shapes of the steps to come), devices."""
    cfg, lora = run.cfg, run.model.lora
    shapes = run_shapes(run.train, cfg.batch_size, cfg.seed, range(start, cfg.steps), layout)
    return (
        f"jlora: {run.base_name} | LoRA r={lora.r} alpha={lora.alpha} scaling={scaling(lora):g} | "
        f"lr={cfg.optim.lr:g} effective lr (lr*alpha/r)={effective_lr(cfg.optim.lr, lora):g} | "
        f"trainable {n_trainable:,} | train: {run.train.summary()} | "
        f"{describe(layout, shapes, shape_bound(cfg.seq_len, cfg.batch_size, layout))} | "
        f"{run.model.config.dtype} | devices {n_devices}" + (f" | resuming at step {start}" if start else "")
    )


def make_evaluator(run: Run, eval_step: EvalStep, feed, *, pmapped: bool, layout: Layout, progress: bool = False):
    """``evaluate(state) -> {"val_loss", "val_ppl"[, "exact_match"]}`` on the run's validation data ({} without).

    With `progress`, a bar counts the evaluation's batches (and is cleared when it ends).
    """
    from tqdm.auto import tqdm

    cfg = run.cfg
    predict = greedy_predictor(run.model)

    def evaluate(state: TrainState) -> dict:
        if run.val is None:
            return {}
        total = n_batches(len(run.val), cfg.batch_size, cfg.eval_batches)
        total += n_batches(min(cfg.exact_match, len(run.val)), cfg.batch_size)
        with tqdm(total=total, desc="evaluating", unit="batch", leave=False, disable=not progress) as bar:
            loss = mean_loss(
                eval_step, state, run.val, cfg.batch_size, max_batches=cfg.eval_batches, feed=feed, progress=bar.update
            )
            out = loss_and_perplexity(loss)
            if cfg.exact_match:
                variables = (unreplicate(state) if pmapped else state).variables
                out["exact_match"] = exact_match(
                    predict, variables, run.val, cfg.exact_match, cfg.batch_size, layout=layout, progress=bar.update
                )
        return out

    return evaluate


def feed_devices(batch: dict, *, n_devices: int, n_hosts: int) -> dict:
    """This process's rows of a global batch, split over its local devices: (n_devices, rows, T)."""
    if n_hosts > 1:
        batch = {k: np.split(v, n_hosts)[jax.process_index()] for k, v in batch.items()}
    return shard_batch(batch, n_devices)
