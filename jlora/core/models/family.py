"""The model families jlora knows, each one value: its config, its module and its checkpoint mapping.

    family = family_of("qwen2")                 # by Hugging Face's model_type (config.json), or of a config
    config = family.config.from_hf(hf_dict, dtype="float32")
    model = family.model(config, lora_cfg)      # GPT2 or Llama: hidden / decode / logits / head_weight / init_cache
    params = family.random_params(seed, config)

A family is a model file (`jlora.core.models.gpt2`, `jlora.core.models.llama`): the Flax module on
the shared adapted `Linear` and decoder pieces, and the Hugging Face mapping (a tensor name to its
path in the tree, its layout, and back). Everything above the models (LoRA targets, the training
step, populations, decoding, PEFT, checkpoints) reads a model through this value and the module's
methods, so a third family is a third file and one line here.

>>> family_of("mistral").name, family_of("gpt2").hf_prefix
('llama', 'transformer.')
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from jlora.core.models import gpt2, llama
from jlora.errors import ConfigError


class Family(NamedTuple):
    """One model family: what builds it and what maps it to and from Hugging Face's checkpoints."""

    name: str  # "gpt2", "llama"
    model_types: tuple[str, ...]  # the config.json model_type values it reads
    config: type  # GPT2Config, LlamaConfig: from_hf(dict, **numerics), to_hf()
    model: type  # the Flax module: model(config, lora)
    hf_prefix: str  # the base model's prefix in checkpoint (and PEFT) tensor names
    blocks: str  # the blocks' node in the parameter tree ("h", "layers")
    modules: tuple[str, ...]  # a block's linear modules, what LoRA adapts ("attn.c_attn", "self_attn.q_proj", ...)
    savable: dict  # {last name of a base module PEFT can save whole: its leaves}
    embedding: str  # the token embedding's module ("wte", "embed_tokens"), tied to the head where tied
    init_params: Callable[[Any, Any], dict]  # (key, config) -> params
    param_shapes: Callable[[Any], dict]  # config -> the tree of ShapeDtypeStructs
    random_params: Callable[[int, Any], dict]  # (seed, config) -> params, the same bits on every machine
    hf_key_to_path: Callable[[str], tuple | None]  # checkpoint key -> path in the tree (None: not ours)
    is_buffer: Callable[[str, Any], bool]  # (key, config): a checkpoint key to skip
    from_hf: Callable[[tuple, Any], Any]  # (path, tensor) -> the tensor in our layout
    state_from_params: Callable[[dict], dict]  # params -> {checkpoint key: numpy array}


GPT2 = Family(
    "gpt2",
    ("gpt2",),
    gpt2.GPT2Config,
    gpt2.GPT2,
    gpt2.HF_PREFIX,
    gpt2.BLOCKS,
    gpt2.MODULES,
    gpt2.SAVABLE,
    "wte",
    gpt2.init_params,
    gpt2.param_shapes,
    gpt2.random_params,
    gpt2.hf_key_to_path,
    gpt2.is_buffer,
    gpt2.from_hf,
    gpt2.state_from_params,
)
LLAMA = Family(
    "llama",
    llama.MODEL_TYPES,
    llama.LlamaConfig,
    llama.Llama,
    llama.HF_PREFIX,
    llama.BLOCKS,
    llama.MODULES,
    llama.SAVABLE,
    "embed_tokens",
    llama.init_params,
    llama.param_shapes,
    llama.random_params,
    llama.hf_key_to_path,
    llama.is_buffer,
    llama.from_hf,
    llama.state_from_params,
)
FAMILIES = (GPT2, LLAMA)


def family_of(what: str | Any) -> Family:
    """The family of a Hugging Face model_type ("gpt2", "llama", "qwen2", "mistral"), of a config, or of a model."""
    config = getattr(what, "config", what)
    for family in FAMILIES:
        if isinstance(config, family.config) or what in family.model_types:
            return family
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise ConfigError(f"unsupported model_type {what!r}; jlora knows {known}")


def family_of_paths(paths) -> Family:
    """The family whose parameter tree these module paths belong to (by their blocks' node: "h", "layers")."""
    roots = {p.split(".")[0] for p in paths}
    for family in FAMILIES:
        if family.blocks in roots:
            return family
    raise ConfigError(f"module paths {sorted(paths)[:3]} belong to no model family jlora knows")


def module_paths_of(family: Family, n_layer: int) -> tuple[str, ...]:
    """Every adaptable module path of an `n_layer` model of `family`, in block order (no slices)."""
    return tuple(f"{family.blocks}.{i}.{m}" for i in range(n_layer) for m in family.modules)


def model_type_of(config: Any) -> str:
    """The Hugging Face model_type of a config ("gpt2" for `GPT2Config`)."""
    return getattr(config, "model_type", "gpt2")


def config_to_dict(config: Any) -> dict:
    """Every field of a model config (numerics included) as plain JSON values, with its ``model_type``:
    what a checkpoint's meta records, `config_from_dict` inverts."""
    values = {f: getattr(config, f) for f in config.__dataclass_fields__}
    values = {k: dict(v) if isinstance(v, Mapping) else v for k, v in values.items()}
    return {"model_type": model_type_of(config), **values}


def config_from_dict(values: Mapping) -> Any:
    """The model config `config_to_dict` wrote (a meta without ``model_type``: GPT-2, as older checkpoints)."""
    values = dict(values)
    family = family_of(values.get("model_type", "gpt2"))
    if family.name == "gpt2":
        values.pop("model_type", None)
    return family.config(**values)
