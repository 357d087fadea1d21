"""What a run is built from: its config, tokenizer, base model, data and first adapters.

    run = build_run(cfg)              # tokenizer, base (model, params), tokenized train / validation data
    run, lora = initial_lora(run)     # fresh adapters (A random, B = 0; PiSSA / OLoRA: from W, on the
                                      # residual base; EVA, LoRA-GA: from the first batches), or
                                      # cfg.init_from's PEFT adapter
    run.start_params                  # the base as training starts: params with the adapter's saved modules
    trainer = solo_trainer(run)       # the state at step 0 and how to compile its step (a population:
                                      # jlora.training.run.population.population_trainer)
    placement_of(cfg, trainer)        # the device mesh its steps compile over (cfg.mesh)
    adapter_of(state.trainable, run.start_leaves, run.init)   # what a checkpoint keeps: {"lora", "base"[, "init"]}

Everything here is decided by the config alone (the random base by ``cfg.seed``, A's
initialisation by the adapter seed), which is what lets a checkpoint name its base instead of
storing it. `params` stays the base exactly as loaded (what a checkpoint's base fingerprint
describes and what `load_checkpoint` loads again); the leaves a PEFT adapter brings (its
``modules_to_save``, e.g. ``ln_f``) are `start_leaves`, put over the base for training and saved
in every checkpoint beside the trained leaves, so the checkpoint restores the model the run trained.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax

from jlora.core.lora.adapter import flatten_adapters, split_slice, with_scaling, without_scaling
from jlora.core.lora.eva import resolved as eva_config
from jlora.core.lora.lora_ga import lora_ga_init
from jlora.core.lora.residual import factors_of, init_adapters
from jlora.core.models.family import config_to_dict, family_of
from jlora.core.update.mesh import Placement, mesh_placement
from jlora.core.update.optim import make_optimizer, partition, trainable_mask
from jlora.core.update.population import Member
from jlora.core.update.probes import eva_adapters, weight_gradients
from jlora.core.update.step import EvalStep, TrainState, TrainStep, init_state, make_eval_step, make_train_step
from jlora.errors import ConfigError, JloraError, RunDirError
from jlora.exchange.hf_checkpoint import load_model
from jlora.training.data.batching import Layout
from jlora.training.data.prompt import chat_example
from jlora.training.data.rows import TokenizedData, batch_at, tokenize
from jlora.training.data.sources import read_examples
from jlora.training.data.tokenizer import load_tokenizer
from jlora.training.records.checkpoint import committed_steps
from jlora.training.run.config import (
    RunConfig,
    adapter_seed,
    check_length,
    load_run_config,
    population_members,
    random_model_config,
)
from jlora.tree import leaves_by_path, overlay, prune, unflatten

PyTree = Any


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """What a run is built from (everything but the training state).

    `val` is None when the config names no validation data; `start_leaves` holds the base
    leaves the run starts from in place of the base's (an ``init_from`` adapter's modules_to_save). A PiSSA / OLoRA /
    LoRA-GA run's `params` are the residual base and `init` the initial factors they were made with; an EVA run's
    `init` its initial factors and its model's LoRA config EVA's (else None).
    """

    cfg: RunConfig
    tokenizer: Any
    model: Any  # the Flax module of the base's family (GPT2, Llama)
    params: dict
    base_name: str
    train: TokenizedData
    val: TokenizedData | None
    forgetting: TokenizedData | None = None  # cfg.eval.forgetting's held-out text
    start_leaves: dict = dataclasses.field(default_factory=dict)
    init: dict | None = None

    @property
    def start_params(self) -> dict:
        """The base parameters training starts from: `params` with `start_leaves` in place."""
        return overlay(self.params, self.start_leaves)


class Trainer(NamedTuple):
    """What a run trains and how, alone or as a population: `jlora.training.run.train`'s one loop drives either.

    A population (`members` set) stacks K adapters: its state carries a member axis, `rng` holds K
    dropout keys, its step's metrics and its evaluations have K values each, `axes` are the
    `jax.vmap` axes of its variables (`jlora.core.update.population.member_axes`) and `ids` the members'
    indices in the run's population (0..K-1; a search's survivors keep theirs).
    """

    run: Run  # re-based on cfg.init_from's adapter, if any
    state: TrainState  # step 0
    mask: PyTree  # the trainable mask of the variables
    rng: jax.Array  # the step's dropout key (K keys for a population)
    make_step: Callable[[Placement], TrainStep]  # the compiled step on a mesh (`placement_of`)
    make_eval_step: Callable[[Placement], EvalStep]
    members: tuple[Member, ...] | None = None
    axes: PyTree | None = None
    ids: tuple[int, ...] | None = None


def tokenizer_source(cfg: RunConfig) -> str:
    """The tokenizer a run uses: ``data.tokenizer``, else the base model's own ("bytes" for a random base)."""
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    return "bytes" if cfg.model.name == "random" else cfg.model.name


def build_base(cfg: RunConfig, vocab_size: int) -> tuple[Any, dict]:
    """The base model and its frozen params: a checkpoint or GGUF file, or a seeded random model."""
    m = cfg.model
    numerics = dict(dtype=m.compute_dtype(jax.default_backend()), param_dtype=m.param_dtype, remat=m.remat)
    if m.name == "random":  # model.random was checked with the config
        config = random_model_config(cfg, vocab_size, **numerics)
        family = family_of(config)
        return family.model(config, cfg.lora), family.random_params(cfg.seed, config)
    model, params = load_model(m.name, cfg.lora, allow_pickle=m.allow_pickle, **numerics)
    check_length(model.config, cfg.seq_len)
    for lora in [cfg.lora] + [m.lora for m in (population_members(cfg) if cfg.population else ())]:
        lora.module_paths(params)  # a target this model lacks: one line before any adapter is made
    return model, params


def build_run(cfg: RunConfig) -> Run:
    """The tokenizer, base model and tokenized data of `cfg`; input errors are `JloraError`s.

    The data is read and tokenized before the base model is loaded: a bad data file costs a line, not a model load.
    """
    read = lambda source, split: read_examples(source, split=split, fmt=cfg.data.format)  # noqa: E731
    train_examples = read(cfg.data.train, "train")
    val_examples = read(cfg.data.validation, "validation") if cfg.data.validation else None
    tokenizer = load_tokenizer(tokenizer_source(cfg))
    if cfg.data.template == "chat":  # the question as the user's turn, the answer as the assistant's
        train_examples = [chat_example(e, tokenizer) for e in train_examples]
        val_examples = None if val_examples is None else [chat_example(e, tokenizer) for e in val_examples]
    train = tokenize(train_examples, tokenizer, cfg.seq_len)
    if len(train) < cfg.batch_size:
        raise ConfigError(f"batch_size={cfg.batch_size} is larger than the {len(train)} training examples")
    val = None if val_examples is None else tokenize(val_examples, tokenizer, cfg.seq_len)
    model, params = build_base(cfg, tokenizer.vocab_size)
    if tokenizer.vocab_size > model.config.vocab_size:  # larger ids would index past the embedding
        raise ConfigError(
            f"the tokenizer {tokenizer_source(cfg)!r} has {tokenizer.vocab_size} tokens, more than the model's "
            f"vocabulary of {model.config.vocab_size}; set data.tokenizer to the model's own"
        )
    forgetting = None
    if cfg.eval.forgetting:
        text = read_examples(cfg.eval.forgetting, split="generic", fmt="text")
        forgetting = tokenize(text, tokenizer, cfg.seq_len)
    return Run(cfg, tokenizer, model, params, cfg.model.name, train, val, forgetting)


def start_from_peft(run: Run) -> tuple[Run, dict]:
    """The run re-based on the PEFT adapter in ``cfg.init_from``: its LoRA config, tree and saved leaves."""
    from jlora.exchange.peft import load_peft
    from jlora.training.records.artifacts import TrainedAdapter, check_finite

    adapter = load_peft(run.cfg.init_from)
    check_finite(
        TrainedAdapter(f"init_from {run.cfg.init_from}", adapter.lora, adapter.config, adapter.modules_to_save or {})
    )
    run = dataclasses.replace(
        run, model=run.model.clone(lora=adapter.config), start_leaves=adapter.modules_to_save or {}
    )
    run.start_params  # noqa: B018 (checks the saved modules' shapes against the base now)
    return run, adapter.lora


def initial_lora(run: Run, init: dict | None = None) -> tuple[Run, dict]:
    """(run, lora): fresh adapters, or those of ``cfg.init_from``.

    A PiSSA / OLoRA init takes A and B from the base weights and returns the run on the
    residual base, with `run.init` the factors; `init` (a checkpoint's) gives those factors
    instead of computing them, so a resumed run trains on the very residual it started with.
    The inits that read the data take it from the run's first training batches, those of steps
    0, 1, ...: EVA (`eva_start`: the run's LoRA config becomes EVA's, its ranks in the patterns)
    and LoRA-GA (`lora_ga_start`: a residual base, as PiSSA's). Their checkpoints keep the initial
    factors too, so a resumed run reads no batch again.
    """
    if run.cfg.init_from:
        return start_from_peft(run)
    key, cfg = init_key(adapter_seed(run.cfg)), run.model.lora
    if cfg.init == "eva":
        return eva_start(run, init)
    if cfg.init == "lora_ga" and init is None:
        init = lora_ga_start(run, key)
    params, lora = init_adapters(key, run.model, run.params, init=init)
    if not cfg.changes_base:
        return run, lora
    return dataclasses.replace(run, params=params, init=factors_of(lora)), lora


def first_batches(run: Run) -> Iterator[dict]:
    """The run's training batches from step 0 on, as the steps will read them (unshaped)."""
    return (batch_at(run.train, i, run.cfg.batch_size, run.cfg.seed) for i in itertools.count())


def eva_start(run: Run, init: dict | None = None) -> tuple[Run, dict]:
    """(run with EVA's LoRA config, its adapters): a PCA of each adapted layer's inputs over the first
    batches (`jlora.core.update.probes.eva_adapters`); `init` (a checkpoint's factors) gives the adapters
    and their ranks without reading a batch."""
    cfg = run.model.lora
    if init is None:
        from tqdm.auto import tqdm

        with tqdm(total=cfg.eva.batches, desc="EVA", unit="batch", leave=False, disable=not sys.stderr.isatty()) as bar:
            found = eva_adapters(run.model, run.params, cfg, first_batches(run), progress=lambda *_: bar.update(1))
        if not found.converged:
            print(
                f"jlora: EVA read {found.batches} batches (lora.eva.batches) before every layer's components "
                f"converged (cosine >= tau={cfg.eva.tau}); it uses them as they are",
                file=sys.stderr,
            )
        resolved, lora = found.config, found.lora
    else:
        flat = flatten_adapters(init)
        ranks = {p: flat[p]["A"].shape[0] if p in flat else 0 for p in cfg.module_paths(run.params)}
        resolved = eva_config(cfg, ranks, run.params)
        lora = with_scaling(init, resolved)
    run = dataclasses.replace(run, model=run.model.clone(lora=resolved), init=factors_of(lora))
    return run, lora


def lora_ga_start(run: Run, key: jax.Array) -> dict:
    """LoRA-GA's initial factors {adapter path: {"A", "B"}}: the gradients of the adapted kernels averaged over
    the first ``lora.lora_ga.batches`` batches (`jlora.core.update.probes.weight_gradients`), then their SVD."""
    cfg = run.model.lora
    modules = tuple(dict.fromkeys(split_slice(p)[0] for p in cfg.module_paths(run.params)))
    batches = itertools.islice(first_batches(run), cfg.lora_ga.batches)
    grads = weight_gradients(run.model, run.params, batches, modules)
    return lora_ga_init(key, cfg, run.params, grads)


def init_key(seed: int) -> jax.Array:
    """The key of A's initialisation for adapter seed `seed` (the dropout keys are ``key(seed)``)."""
    return jax.random.fold_in(jax.random.key(seed), 1)


def solo_trainer(run: Run, init: dict | None = None) -> Trainer:
    """One adapter (`initial_lora`; `init`: a PiSSA / OLoRA checkpoint's factors) and the trainable
    base leaves the config names, at step 0."""
    cfg = run.cfg
    run, lora = initial_lora(run, init)
    variables = {"params": run.start_params, "lora": lora}
    mask = trainable_mask(variables, bias=cfg.trainable.bias, modules_to_save=cfg.trainable.modules_to_save)
    return trainer_of(run, variables, mask)


def trainer_of(run: Run, variables: dict, mask: PyTree) -> Trainer:
    """The `Trainer` of the leaves of `variables` that `mask` selects, with ``run.cfg``'s optimizer and the
    dropout keys of its adapter seed: a solo run's, and what the research scripts train (a full fine-tune, a
    member alone) through the same step."""
    cfg = run.cfg
    optimizer = make_optimizer(cfg.optim, partition(variables, mask)[0], adalora=cfg.adalora)
    return Trainer(
        run,
        init_state(variables, mask, optimizer),
        mask,
        jax.random.key(adapter_seed(cfg)),
        lambda placement: make_train_step(run.model, optimizer, cfg.optim, placement=placement),
        lambda placement: make_eval_step(run.model, placement=placement),
    )


def placement_of(cfg: RunConfig, trainer: Trainer) -> Placement:
    """The device mesh of `trainer`'s steps: every process's devices, ``cfg.mesh.fsdp`` of them along "fsdp",
    the trainer's members spread along "member" (`jlora.core.update.mesh.mesh_placement`)."""
    return mesh_placement(1 if trainer.members is None else len(trainer.members), fsdp=cfg.mesh.fsdp)


def checkpoint_meta(run: Run, step: int, identity: dict) -> dict:
    """The JSON a checkpoint carries: enough to rebuild the model and adapters without the run directory."""
    return {
        "step": step,
        "seed": run.cfg.seed,
        "data_position": step * run.cfg.batch_size,
        "lora_config": run.model.lora.to_dict(),
        "model_config": config_to_dict(run.model.config),
        "tokenizer": tokenizer_source(run.cfg),
        "base_model": identity,
        "trainable": {"bias": run.cfg.trainable.bias, "modules_to_save": list(run.cfg.trainable.modules_to_save)},
        **adalora_meta(run.cfg),
    }


def adalora_meta(cfg: RunConfig) -> dict:
    """An AdaLoRA run's schedule for its checkpoints (``total_step`` resolved), which PEFT's format records."""
    if cfg.adalora is None:
        return {}
    return {"adalora": dataclasses.asdict(dataclasses.replace(cfg.adalora, total_step=cfg.adalora.steps(cfg.steps)))}


def adapter_of(trainable: dict, start_leaves: dict | None = None, init: dict | None = None) -> dict:
    """What a checkpoint keeps: {"lora": the adapters' factors, "base": base leaves that differ from the loaded
    base[, "init"]} (the scales follow from the checkpoint's LoRA config).

    "base" holds the trained base leaves of the trainable partition and the `start_leaves` the run
    began from (a trained leaf wins where both have one), as one pruned tree; "init" a PiSSA /
    OLoRA run's initial factors, from which its residual base is rebuilt.
    """
    base = {**leaves_by_path(start_leaves or {}), **leaves_by_path(prune(trainable.get("params", {})))}
    adapter = {"lora": without_scaling(trainable["lora"]), "base": unflatten(base)}
    return adapter if init is None else {**adapter, "init": init}


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of a nested plain dict, in its own order (None and lists are values)."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    return {
        k: v for name, child in tree.items() for k, v in _flat(child, f"{prefix}.{name}" if prefix else name).items()
    }


def check_config_matches(run_dir: Path, cfg: RunConfig) -> None:
    """Refuse to resume `run_dir` with a config other than the one it was started with (`steps` may grow,
    not below the steps already trained; the `mesh` may change).

    The message names the first key that differs, with the run's value and the new one.
    """
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    trained = committed_steps(run_dir)
    if trained and trained[0] > cfg.steps:  # resuming would train nothing, and rewrite config.yaml with fewer steps
        raise RunDirError(
            f"steps={cfg.steps}: {run_dir} has trained {trained[0]} steps already (its newest checkpoint); resume "
            f"with steps >= {trained[0]}, or choose another --out"
        )
    try:
        old = _flat(load_run_config(saved).to_dict())
    except JloraError as e:
        raise RunDirError(f"{saved} cannot be read ({e}); use another --out") from None
    new = _flat(cfg.to_dict())
    # steps may grow; the mesh is where the run computes, not what (a checkpoint restores on any devices)
    changed = [k for k in {**new, **old} if k != "steps" and not k.startswith("mesh.") and old.get(k) != new.get(k)]
    if changed:
        key = changed[0]
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise RunDirError(
            f"{run_dir} holds a run with {key}={old.get(key)!r}, not {new.get(key)!r}{more}; "
            "use another --out, or the run's own config"
        )


def layout_of(cfg: RunConfig, n_devices: int) -> Layout:
    """A run's layout: ``data.buckets`` and ``data.pack``, sequences in multiples of devices x micro-batches."""
    return Layout(cfg.data.buckets, cfg.data.pack, n_devices * cfg.optim.grad_accum)
