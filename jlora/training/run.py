"""What a run is built from: its config, tokenizer, base model, data and first adapters.

    run = build_run(cfg)              # tokenizer, base (model, params), tokenized train / validation data
    run, lora = initial_lora(run)     # fresh adapters (A random, B = 0; PiSSA / OLoRA: from W, on the
                                      # residual base), or cfg.init_from's PEFT adapter
    adapter_of(state.trainable, run.init)   # what a checkpoint keeps: {"lora", "base": trained base leaves[, "init"]}

Everything here is decided by the config alone (the random base and A's initialisation are
seeded by ``cfg.seed``), which is what lets a checkpoint name its base instead of storing it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax

from jlora.core.gpt2 import GPT2, GPT2Config, init_params
from jlora.core.residual import factors_of, init_adapters
from jlora.errors import ConfigError, RunDirError
from jlora.exchange.hf_checkpoint import load_gpt2
from jlora.training.data import TokenizedData, read_examples, tokenize
from jlora.training.run_config import RunConfig, load_run_config
from jlora.training.tokenizer import load_tokenizer
from jlora.tree import prune


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """What a run is built from (everything but the training state).

    `val` is None when the config names no validation data. A PiSSA / OLoRA run's `params`
    are the residual base and `init` the initial factors they were made with (else None).
    """

    cfg: RunConfig
    tokenizer: Any
    model: GPT2
    params: dict
    base_name: str
    train: TokenizedData
    val: TokenizedData | None
    init: dict | None = None


def tokenizer_source(cfg: RunConfig) -> str:
    """The tokenizer a run uses: ``data.tokenizer``, else the base model's own ("bytes" for a random base)."""
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
    """The tokenizer, base model and tokenized data of `cfg`; input errors are `JloraError`s."""
    tokenizer = load_tokenizer(tokenizer_source(cfg))
    model, params = build_base(cfg, tokenizer.vocab_size)
    if tokenizer.vocab_size > model.config.vocab_size:  # larger ids would index past the embedding
        raise ConfigError(
            f"the tokenizer {tokenizer_source(cfg)!r} has {tokenizer.vocab_size} tokens, more than the model's "
            f"vocabulary of {model.config.vocab_size}; set data.tokenizer to the model's own"
        )
    read = lambda source, split: read_examples(source, split=split, fmt=cfg.data.format)  # noqa: E731
    train = tokenize(read(cfg.data.train, "train"), tokenizer, cfg.seq_len)
    if len(train) < cfg.batch_size:
        raise ConfigError(f"batch_size={cfg.batch_size} is larger than the {len(train)} training examples")
    val = tokenize(read(cfg.data.validation, "validation"), tokenizer, cfg.seq_len) if cfg.data.validation else None
    return Run(cfg, tokenizer, model, params, cfg.model.name, train, val)


def start_from_peft(run: Run) -> tuple[Run, dict]:
    """The run re-based on the PEFT adapter in ``cfg.init_from``: its LoRA config, tree and saved leaves."""
    from jlora.exchange.peft import load_peft
    from jlora.tree import overlay

    adapter = load_peft(run.cfg.init_from)
    run = dataclasses.replace(
        run, model=run.model.clone(lora=adapter.config), params=overlay(run.params, adapter.modules_to_save)
    )
    return run, adapter.lora


def initial_lora(run: Run, init: dict | None = None) -> tuple[Run, dict]:
    """(run, lora): fresh adapters, or those of ``cfg.init_from``.

    A PiSSA / OLoRA init takes A and B from the base weights and returns the run on the
    residual base, with `run.init` the factors; `init` (a checkpoint's) gives those factors
    instead of computing them, so a resumed run trains on the very residual it started with.
    """
    if run.cfg.init_from:
        return start_from_peft(run)
    key = jax.random.fold_in(jax.random.key(run.cfg.seed), 1)
    params, lora = init_adapters(key, run.model, run.params, init=init)
    if not run.model.lora.changes_base:
        return run, lora
    return dataclasses.replace(run, params=params, init=factors_of(lora)), lora


def checkpoint_meta(run: Run, step: int, identity: dict) -> dict:
    """The JSON a checkpoint carries: enough to rebuild the model and adapters without the run directory."""
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


def adapter_of(trainable: dict, init: dict | None = None) -> dict:
    """A checkpoint's adapter: {"lora": adapters, "base": trained base leaves (pruned)[, "init": initial factors]}."""
    adapter = {"lora": trainable["lora"], "base": prune(trainable.get("params", {}))}
    return adapter if init is None else {**adapter, "init": init}


def check_config_matches(run_dir: Path, cfg: RunConfig) -> None:
    """Refuse to resume `run_dir` with a config other than the one it was started with (`steps` may grow)."""
    saved = run_dir / "config.yaml"
    if not saved.exists():
        return
    old = load_run_config(saved).to_dict()
    new = cfg.to_dict()
    old.pop("steps", None), new.pop("steps", None)  # a resumed run may be extended
    changed = sorted(k for k in new if old.get(k) != new[k])
    if changed:
        raise RunDirError(f"{run_dir} holds a run with a different config ({', '.join(changed)}); use another --out")
