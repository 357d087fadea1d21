"""The training loop behind `jlora train`: build a run from its config, step, log, evaluate, save.

    cfg ─> tokenizer, base (model, params), data ─> {"params", "lora"} ─partition(mask)─> TrainState
    for step: batch_at(data, step) ─> train_step ─> metrics.jsonl, TensorBoard, progress bar
              every eval_every: validation loss, perplexity, exact match of greedy answers
              every checkpoint.every: Orbax checkpoint of the adapter and optimizer state

Everything a step depends on is a function of (config, step): the batch is `batch_at(data,
step)` and the dropout key is `fold_in(key(seed), step)`. So the same command on the same
RUN_DIR resumes from the newest checkpoint and reproduces an uninterrupted run's losses.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jlora import checkpoint as ckpt
from jlora.data import batch_at, eval_batches, greedy_exact_match, read_examples, tokenize
from jlora.gpt2 import GPT2, GPT2Config, init_params
from jlora.hf_checkpoint import load_gpt2
from jlora.lora import init_lora
from jlora.lora_config import effective_lr, scaling
from jlora.metrics import MetricsWriter
from jlora.optim import make_optimizer, partition, trainable_mask
from jlora.run_config import ConfigError, RunConfig, load_run_config, save_run_config
from jlora.tokenizer import load_tokenizer
from jlora.train_step import (
    TrainState,
    init_state,
    make_eval_step,
    make_train_step,
    replicate,
    shard_batch,
    unreplicate,
)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped before saving the bad state."""


@dataclass
class Run:
    """What a run is built from (everything but the training state)."""

    cfg: RunConfig
    tokenizer: Any
    model: GPT2
    params: dict
    base_name: str


def tokenizer_source(cfg: RunConfig) -> str:
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    return "bytes" if cfg.model.name == "random" else cfg.model.name


def build_base(cfg: RunConfig, vocab_size: int) -> tuple[GPT2, dict]:
    """The base model and its frozen params: a checkpoint, or a seeded random GPT-2."""
    m = cfg.model
    numerics = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat)
    if m.name == "random":
        try:
            config = GPT2Config(
                **{"vocab_size": vocab_size, "n_positions": max(cfg.seq_len, 128), **m.random}, **numerics
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model.random: {e}") from None
        return GPT2(config, cfg.lora), init_params(jax.random.key(cfg.seed), config)
    model, params = load_gpt2(m.name, cfg.lora, allow_pickle=m.allow_pickle, **numerics)
    if cfg.seq_len > model.config.n_positions:
        raise ConfigError(f"seq_len={cfg.seq_len} is longer than the model's n_positions={model.config.n_positions}")
    return model, params


def build_run(cfg: RunConfig) -> Run:
    tokenizer = load_tokenizer(tokenizer_source(cfg))
    model, params = build_base(cfg, tokenizer.vocab_size)
    if tokenizer.vocab_size > model.config.vocab_size:  # larger ids would index past the embedding
        raise ConfigError(
            f"the tokenizer {tokenizer_source(cfg)!r} has {tokenizer.vocab_size} tokens, more than the model's "
            f"vocabulary of {model.config.vocab_size}; set data.tokenizer to the model's own"
        )
    return Run(cfg, tokenizer, model, params, cfg.model.name)


def start_from_peft(run: Run) -> tuple[Run, dict]:
    """The run re-based on the PEFT adapter in ``cfg.init_from``: its LoRA config, tree and saved leaves."""
    from jlora.peft import load_peft, with_base_leaves

    adapter = load_peft(run.cfg.init_from)
    run = dataclasses.replace(
        run, model=run.model.clone(lora=adapter.config), params=with_base_leaves(run.params, adapter.modules_to_save)
    )
    return run, adapter.lora


def initial_lora(run: Run) -> tuple[Run, dict]:
    """(run, lora): fresh adapters (A random, B = 0), or those of ``cfg.init_from``."""
    if run.cfg.init_from:
        return start_from_peft(run)
    return run, init_lora(jax.random.fold_in(jax.random.key(run.cfg.seed), 1), run.model, run.params)


def checkpoint_meta(run: Run, state: TrainState, identity: dict) -> dict:
    step = int(np.asarray(state.step))
    return {
        "step": step,
        "seed": run.cfg.seed,
        "data_position": step * run.cfg.batch_size,
        "lora_config": run.model.lora.to_dict(),
        "model_config": dict(vars(run.model.config)),
        "tokenizer": tokenizer_source(run.cfg),
        "base_model": identity,
        "trainable": {"bias": run.cfg.trainable.bias, "modules_to_save": list(run.cfg.trainable.modules_to_save)},
    }


def adapter_of(trainable: dict) -> dict:
    """{"lora": adapters, "base": trained base leaves (pruned tree)} from the trainable partition."""
    return {"lora": trainable["lora"], "base": _prune(trainable.get("params", {}))}


def _prune(tree: Any) -> Any:
    if isinstance(tree, dict):
        kept = {k: _prune(v) for k, v in tree.items()}
        return {k: v for k, v in kept.items() if v is not None and not (isinstance(v, dict) and not v)}
    return tree


def _check_config_matches(run_dir: Path, cfg: RunConfig) -> None:
    saved = run_dir / "config.yaml"
    if not saved.exists():
        return
    old = load_run_config(saved).to_dict()
    new = cfg.to_dict()
    old.pop("steps", None), new.pop("steps", None)  # a resumed run may be extended
    changed = sorted(k for k in new if old.get(k) != new[k])
    if changed:
        raise ConfigError(f"{run_dir} holds a run with a different config ({', '.join(changed)}); use another --out")


def mean_loss(eval_step, variables, data, batch_size: int, *, max_batches: int | None = None, feed=None) -> float:
    """Mean masked loss over `data`'s evaluation batches (the first `max_batches`), divided once.

    `eval_step` is a `make_eval_step`; `feed` places a host batch (e.g. shards it for pmap).
    """
    total, count = 0.0, 0.0
    for i, batch in enumerate(eval_batches(data, batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        s, c = eval_step(variables, batch if feed is None else feed(batch))
        # pmap's psum leaves the same total on every device: read one copy
        total += float(np.asarray(s).reshape(-1)[0])
        count += float(np.asarray(c).reshape(-1)[0])
    return total / max(count, 1.0)


def evaluate(cfg: RunConfig, eval_step, state: TrainState, val_data, feed) -> dict:
    """Validation loss (mean over answer tokens) and perplexity over `val_data`."""
    loss = mean_loss(eval_step, state, val_data, cfg.batch_size, max_batches=cfg.eval_batches, feed=feed)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


def greedy_predictor(model: GPT2):
    """``predict(variables, ids) -> (B, T)`` argmax of the logits at each position, jit-compiled."""
    return jax.jit(lambda variables, ids: jax.numpy.argmax(model.apply(variables, ids), axis=-1))


def exact_match(predict, variables: dict, data, n: int, batch_size: int) -> float:
    """Fraction of the first `n` rows whose completion greedy decoding reproduces exactly.

    One teacher-forced forward pass per batch decides it (see `jlora.data.greedy_exact_match`);
    `predict` is a `greedy_predictor`.
    """
    hits, rows = 0, 0
    for batch in eval_batches(data, batch_size):
        take = min(batch_size, n - rows)
        if take <= 0:
            break
        predictions = np.asarray(predict(variables, batch["input_ids"]))
        ok = greedy_exact_match(predictions, batch["targets"], batch["loss_mask"])[:take]
        real = batch["loss_mask"][:take].any(axis=-1)
        hits, rows = hits + int(ok[real].sum()), rows + int(real.sum())
    return hits / max(rows, 1)


def train(cfg: RunConfig, run_dir: str | Path, *, progress: bool = True) -> dict:
    """Run (or resume) training as `cfg` says, in `run_dir`; returns the last metrics."""
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    _check_config_matches(run_dir, cfg)
    run = build_run(cfg)
    train_examples = read_examples(cfg.data.train, split="train", fmt=cfg.data.format)
    train_data = tokenize(train_examples, run.tokenizer, cfg.seq_len)
    val_examples = (
        read_examples(cfg.data.validation, split="validation", fmt=cfg.data.format) if cfg.data.validation else []
    )
    val_data = tokenize(val_examples, run.tokenizer, cfg.seq_len) if val_examples else None
    if len(train_data) < cfg.batch_size:
        raise ConfigError(f"batch_size={cfg.batch_size} is larger than the {len(train_data)} training examples")

    identity = ckpt.base_identity(run.base_name, run.params)
    run, lora = initial_lora(run)
    variables = {"params": run.params, "lora": lora}
    mask = trainable_mask(variables, bias=cfg.trainable.bias, modules_to_save=cfg.trainable.modules_to_save)
    ocfg = cfg.optim
    optimizer = make_optimizer(ocfg, partition(variables, mask)[0])
    state = init_state(variables, mask, optimizer)

    run_dir.mkdir(parents=True, exist_ok=True)
    save_run_config(cfg, run_dir / "config.yaml")
    manager = ckpt.open_manager(run_dir, max_to_keep=cfg.checkpoint.max_to_keep)
    start = 0
    latest = manager.latest_step()
    if latest is not None:
        adapter, opt_state, meta = ckpt.restore(manager, latest, adapter_of(state.trainable), state.opt_state)
        ckpt.check_base(meta["base_model"], run.params)
        trainable = _restore_trainable(state.trainable, adapter)
        state = state.replace(trainable=trainable, opt_state=opt_state, step=np.asarray(latest, np.int32))
        start = latest
    writer = MetricsWriter(run_dir, truncate_after=start)

    n_devices, n_hosts = jax.local_device_count(), jax.process_count()
    if cfg.batch_size % (n_devices * n_hosts):
        raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by the {n_devices * n_hosts} devices")
    train_step = make_train_step(run.model, optimizer, ocfg, n_devices=n_devices)
    eval_step = make_eval_step(run.model, n_devices=n_devices)
    pmapped = train_step.pmapped
    feed = partial(_feed, n_devices=n_devices, n_hosts=n_hosts) if pmapped else (lambda batch: batch)
    n_trainable = sum(x.size for x in jax.tree.leaves(state.trainable))
    if pmapped:
        state = replicate(state, n_devices)
    host_state = lambda: unreplicate(state) if pmapped else state  # noqa: E731

    lora_cfg = run.model.lora
    print(
        f"jlora: {run.base_name} | LoRA r={lora_cfg.r} alpha={lora_cfg.alpha} scaling={scaling(lora_cfg):g} | "
        f"lr={ocfg.lr:g} effective lr (lr*alpha/r)={effective_lr(ocfg.lr, lora_cfg):g} | "
        f"trainable {n_trainable:,} | "
        f"train: {train_data.summary()} | devices {n_devices * n_hosts}"
        + (f" | resuming at step {start}" if start else "")
    )

    predict = greedy_predictor(run.model)

    def run_eval(step: int) -> dict:
        if val_data is None:
            return {}
        out = evaluate(cfg, eval_step, state, val_data, feed)
        if cfg.exact_match:
            out["exact_match"] = exact_match(predict, host_state().variables, val_data, cfg.exact_match, cfg.batch_size)
        return out

    last: dict = {}
    if start == 0:
        writer.write({"step": 0, **run_eval(0)})
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, dynamic_ncols=True, unit="step")
    pending: list = []
    tokens, clock = 0, time.perf_counter()
    key = jax.random.key(cfg.seed)
    for step in range(start, cfg.steps):
        batch = batch_at(train_data, step, cfg.batch_size, cfg.seed)
        tokens += int(batch["input_ids"].size)
        rng = jax.random.fold_in(key, step)
        state, metrics = train_step(state, feed(batch), rng)
        pending.append((step + 1, metrics))
        done = step + 1
        boundary = done == cfg.steps or done % cfg.checkpoint.every == 0 or done % cfg.eval_every == 0
        if done % cfg.log_every == 0 or boundary:
            rows = _fetch(pending, pmapped)
            pending = []
            elapsed = time.perf_counter() - clock
            for row in rows:
                if not math.isfinite(row["loss"]):
                    bar.close()
                    raise NonFiniteLossError(
                        f"loss is {row['loss']} at step {row['step']}; stopped without saving this state "
                        f"(newest checkpoint: step {manager.latest_step()})"
                    )
            rows[-1]["tokens_per_s"] = tokens / elapsed
            for row in rows:
                writer.write(row)
            last = rows[-1]
            bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}", tok_s=f"{last['tokens_per_s']:.0f}")
            tokens, clock = 0, time.perf_counter()
        if done % cfg.eval_every == 0 or done == cfg.steps:
            result = run_eval(done)
            writer.write({"step": done, **result})
            last = {**last, **result}
            bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
        if done % cfg.checkpoint.every == 0 or done == cfg.steps:
            h = host_state()
            ckpt.save(manager, done, adapter_of(h.trainable), h.opt_state, checkpoint_meta(run, h, identity))
        bar.update(1)
    bar.close()
    writer.close()
    (run_dir / "summary.json").write_text(json.dumps({"step": cfg.steps, **last}, indent=2) + "\n")
    return last


def _restore_trainable(trainable: dict, adapter: dict) -> dict:
    """The trainable partition with the restored adapter and base leaves put in place."""
    restored = {"lora": adapter["lora"]}
    base = adapter.get("base") or {}

    def put(node, saved):
        if isinstance(node, dict):
            return {k: put(v, saved.get(k, {}) if isinstance(saved, dict) else {}) for k, v in node.items()}
        return saved if node is not None else None

    restored["params"] = put(trainable.get("params", {}), base)
    return {k: restored.get(k, v) for k, v in trainable.items()}


def _feed(batch: dict, *, n_devices: int, n_hosts: int) -> dict:
    """This process's rows of a global batch, split over its local devices: (n_devices, rows, T)."""
    if n_hosts > 1:
        batch = {k: np.split(v, n_hosts)[jax.process_index()] for k, v in batch.items()}
    return shard_batch(batch, n_devices)


def _fetch(pending: list, pmapped: bool) -> list[dict]:
    """Device metrics -> host rows {"step", "loss", ...} (one transfer for the whole window)."""
    steps = [s for s, _ in pending]
    values = jax.device_get([m for _, m in pending])
    rows = []
    for step, m in zip(steps, values):
        row = {"step": step}
        for k, v in m.items():
            v = np.asarray(v)
            row[k] = float(v.reshape(-1)[0] if pmapped else v)
        rows.append(row)
    return rows
