"""`jlora train`: a run built from its config, resumed if its directory has a checkpoint, then looped.

    cfg ─build_run─> tokenizer, base (model, params), data ─initial_lora─> {"params", "lora"}
        ─partition(mask)─> TrainState ─resume─> state at the newest checkpoint (or step 0)
    Session(trainer, run_dir) ─> run_hooks(session.steps(), session.hooks())    (jlora.training.run.session)
        hooks: log, evaluation, [rung], [telemetry], checkpoint, progress

Everything an update depends on is a function of (config, step): the batch is `batch_at(data,
step)` and the dropout key is ``fold_in(key(adapter seed), step)``. So the same command on the same
RUN_DIR resumes from the newest checkpoint and reproduces an uninterrupted run's losses.

A config with a ``population:`` section trains its members at once through the same loop: the
trainer (`jlora.training.run.population.population_trainer`) stacks their adapters, and every hook
writes a row per member. With a ``search:`` section too (`jlora.training.run.search`) the loop runs
from rung to rung: a rung hook decides who goes on, and the population shrinks to its survivors.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax

from jlora.errors import ConfigError, Interrupted
from jlora.training.records import checkpoint as ckpt
from jlora.training.records.rundir import check_run_dir, hold_run_dir
from jlora.training.run.build import build_run, check_config_matches, placement_of, solo_trainer
from jlora.training.run.config import RunConfig, save_run_config
from jlora.training.run.interrupt import stop_requests
from jlora.training.run.loop import run_hooks
from jlora.training.run.population import population_trainer
from jlora.training.run.session import Session


def train(cfg: RunConfig, run_dir: str | Path, *, progress: bool = True, until: int | None = None) -> dict:
    """Run (or resume) training as `cfg` says, in `run_dir`; returns the summary (the last metrics).

    Input errors are raised before anything is written; a run stopped by SIGINT or SIGTERM saves
    a checkpoint at the update it reached and raises `Interrupted`. `until` stops after that update
    (checkpointed there; the learning-rate schedule stays the one of ``cfg.steps``), as a scheduler
    pausing a trial does: the same call with a later `until`, or none, goes on from there.
    """
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
    placement_of(cfg, trainer).tree_shardings(trainer.run.params)  # a base weight fsdp cannot split: one line, now

    with hold_run_dir(run_dir), stop_requests(every=cfg.log_every) as stop_requested:
        check_config_matches(run_dir, cfg)  # again: now no other run can write the folder
        session = Session(trainer, run_dir, identity, stop=stop, progress=progress)
        if session.primary:
            save_run_config(cfg, run_dir / "config.yaml")
        with session:
            session.evaluate_start()
            last = run_hooks(session.steps(stop_requested), session.hooks())
        if last is not None and last.interrupted:
            raise Interrupted(f"interrupted at step {last.step}; saved a checkpoint there, the same command resumes it")
        summary = session.summary()
        if session.primary:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
