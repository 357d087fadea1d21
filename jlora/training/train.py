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
from functools import partial
from pathlib import Path

import jax
import numpy as np

from jlora.core.lora_config import effective_lr, scaling
from jlora.core.optim import count_params, make_optimizer, partition, trainable_mask
from jlora.core.parallel import replicate, shard_batch, unreplicate
from jlora.core.step import TrainState, init_state, make_eval_step, make_train_step
from jlora.errors import ConfigError
from jlora.training import checkpoint as ckpt
from jlora.training.data import batch_at
from jlora.training.evaluate import exact_match, greedy_predictor, loss_and_perplexity, mean_loss
from jlora.training.hooks import MetricsLog
from jlora.training.loop import Hook, StepInfo, run_hooks, train_steps
from jlora.training.metrics import MetricsWriter
from jlora.training.run import Run, adapter_of, build_run, check_config_matches, checkpoint_meta, initial_lora
from jlora.training.run_config import RunConfig, save_run_config
from jlora.tree import restore


def train(cfg: RunConfig, run_dir: str | Path, *, progress: bool = True) -> dict:
    """Run (or resume) training as `cfg` says, in `run_dir`; returns the last metrics."""
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    check_config_matches(run_dir, cfg)
    run = build_run(cfg)
    identity = ckpt.base_identity(run.base_name, run.params)  # the original base, also under PiSSA / OLoRA
    newest = ckpt.latest_checkpoint(run_dir)
    run, lora = initial_lora(run, init=ckpt.load_init(newest) if newest else None)
    variables = {"params": run.params, "lora": lora}
    mask = trainable_mask(variables, bias=cfg.trainable.bias, modules_to_save=cfg.trainable.modules_to_save)
    optimizer = make_optimizer(cfg.optim, partition(variables, mask)[0])
    state = init_state(variables, mask, optimizer)

    run_dir.mkdir(parents=True, exist_ok=True)
    save_run_config(cfg, run_dir / "config.yaml")
    manager = ckpt.open_manager(run_dir, max_to_keep=cfg.checkpoint.max_to_keep)
    state, start = resume(manager, state, identity, run.init)

    n_devices, n_hosts = jax.local_device_count(), jax.process_count()
    if cfg.batch_size % (n_devices * n_hosts):
        raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by the {n_devices * n_hosts} devices")
    step = make_train_step(run.model, optimizer, cfg.optim, n_devices=n_devices)
    feed = partial(feed_devices, n_devices=n_devices, n_hosts=n_hosts) if step.pmapped else (lambda batch: batch)
    n_trainable = count_params(state.trainable)
    if step.pmapped:
        state = replicate(state, n_devices)
    print(header(run, n_trainable, n_devices * n_hosts, start))

    writer = MetricsWriter(run_dir, truncate_after=start)
    evaluate = make_evaluator(run, feed, pmapped=step.pmapped, n_devices=n_devices)
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, dynamic_ncols=True, unit="step")

    def evaluation(info: StepInfo) -> None:
        result = evaluate(info.state)
        writer.write({"step": info.step, **result})
        log.last = {**log.last, **result}
        bar.write(f"step {info.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))

    def checkpoint(info: StepInfo) -> None:
        host = unreplicate(info.state) if step.pmapped else info.state
        meta = checkpoint_meta(run, info.step, identity)
        ckpt.save(manager, info.step, adapter_of(host.trainable, run.init), host.opt_state, meta)

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
        Hook(evaluation, every=cfg.eval_every),
        Hook(checkpoint, every=cfg.checkpoint.every),
        Hook(lambda info: bar.update(1), every=1),
    ]
    try:
        if start == 0:
            writer.write({"step": 0, **evaluate(state)})
        batch_for = lambda i: feed(batch_at(run.train, i, cfg.batch_size, cfg.seed))  # noqa: E731
        steps = train_steps(step, state, batch_for, jax.random.key(cfg.seed), start=start, stop=cfg.steps)
        run_hooks(steps, hooks)
    finally:
        bar.close()
        writer.close()
    (run_dir / "summary.json").write_text(json.dumps({"step": cfg.steps, **log.last}, indent=2) + "\n")
    return log.last


def resume(manager, state: TrainState, identity: dict, init: dict | None = None) -> tuple[TrainState, int]:
    """(state, start step): the newest checkpoint's adapters and optimizer state put into `state`, or step 0.

    `identity` is the original base's (`ckpt.base_identity`; a PiSSA / OLoRA run trains on a
    residual of it), `init` such a run's initial factors.
    """
    latest = manager.latest_step()
    if latest is None:
        return state, 0
    adapter, opt_state, meta = ckpt.restore(manager, latest, adapter_of(state.trainable, init), state.opt_state)
    ckpt.check_identity(meta["base_model"], identity)
    trainable = restore(state.trainable, {"params": adapter.get("base") or {}, "lora": adapter["lora"]})
    return state.replace(trainable=trainable, opt_state=opt_state, step=np.asarray(latest, np.int32)), latest


def header(run: Run, n_trainable: int, n_devices: int, start: int) -> str:
    """The run's first line: base, scaling and effective learning rate, trainable size, data, devices."""
    cfg, lora = run.cfg, run.model.lora
    return (
        f"jlora: {run.base_name} | LoRA r={lora.r} alpha={lora.alpha} scaling={scaling(lora):g} | "
        f"lr={cfg.optim.lr:g} effective lr (lr*alpha/r)={effective_lr(cfg.optim.lr, lora):g} | "
        f"trainable {n_trainable:,} | train: {run.train.summary()} | devices {n_devices}"
        + (f" | resuming at step {start}" if start else "")
    )


def make_evaluator(run: Run, feed, *, pmapped: bool, n_devices: int):
    """``evaluate(state) -> {"val_loss", "val_ppl"[, "exact_match"]}`` on the run's validation data ({} without)."""
    cfg = run.cfg
    eval_step = make_eval_step(run.model, n_devices=n_devices)
    predict = greedy_predictor(run.model)

    def evaluate(state: TrainState) -> dict:
        if run.val is None:
            return {}
        loss = mean_loss(eval_step, state, run.val, cfg.batch_size, max_batches=cfg.eval_batches, feed=feed)
        out = loss_and_perplexity(loss)
        if cfg.exact_match:
            variables = (unreplicate(state) if pmapped else state).variables
            out["exact_match"] = exact_match(predict, variables, run.val, cfg.exact_match, cfg.batch_size)
        return out

    return evaluate


def feed_devices(batch: dict, *, n_devices: int, n_hosts: int) -> dict:
    """This process's rows of a global batch, split over its local devices: (n_devices, rows, T)."""
    if n_hosts > 1:
        batch = {k: np.split(v, n_hosts)[jax.process_index()] for k, v in batch.items()}
    return shard_batch(batch, n_devices)
