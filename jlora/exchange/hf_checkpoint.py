"""Hugging Face GPT-2 checkpoints <-> jlora's parameter tree.

The mapping is one rename per tensor and no transpose (Conv1D already stores (d_in, d_out))::

    transformer.wte.weight              <-> wte/embedding
    transformer.wpe.weight              <-> wpe/embedding
    transformer.h.{i}.ln_1.weight       <-> h/{i}/ln_1/scale        (likewise .bias, ln_2, ln_f)
    transformer.h.{i}.attn.c_attn.weight<-> h/{i}/attn/c_attn/kernel (likewise c_proj, mlp.*)
    lm_head.weight                       (tied to wte: checked, never stored twice)

Older checkpoints drop the ``transformer.`` prefix and carry the causal-mask buffers
``h.{i}.attn.bias`` / ``masked_bias``, which are skipped.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core.lora.config import LoraConfig
from jlora.core.models.gpt2 import GPT2, GPT2Config, param_shapes
from jlora.errors import CheckpointError, ConfigError, JloraError, describe

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _leaf_name(hf_name: str) -> str:
    return {"weight": "kernel", "bias": "bias"}[hf_name]


def hf_key_to_path(key: str) -> tuple[str, ...] | None:
    """A checkpoint key -> its path in the parameter tree (None: a key jlora does not keep)."""
    key = key.removeprefix("transformer.")
    parts = key.split(".")
    if parts[0] in ("wte", "wpe") and parts[1:] == ["weight"]:
        return (parts[0], "embedding")
    if parts[0] == "ln_f":
        return ("ln_f", "scale" if parts[1] == "weight" else "bias")
    if parts[0] == "h" and len(parts) == 4 and parts[2] in ("ln_1", "ln_2"):
        return ("h", parts[1], parts[2], "scale" if parts[3] == "weight" else "bias")
    if parts[0] == "h" and len(parts) == 5 and parts[2] in ("attn", "mlp"):
        return ("h", parts[1], parts[2], parts[3], _leaf_name(parts[4]))
    return None


def _is_buffer(key: str) -> bool:
    key = key.removeprefix("transformer.")
    parts = key.split(".")
    return key.startswith("lm_head.") or (
        len(parts) == 4 and parts[2] == "attn" and parts[3] in ("bias", "masked_bias")
    )


def params_from_state(state: Mapping[str, np.ndarray], config: GPT2Config) -> dict:
    """A flat Hugging Face state dict -> the nested parameter tree, checked against `config`.

    Raises CheckpointError naming missing, unexpected or mis-shaped tensors.
    """
    expected = {
        tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(param_shapes(config))
    }
    found: dict[tuple[str, ...], np.ndarray] = {}
    unexpected = []
    for key, value in state.items():
        path = hf_key_to_path(key)
        if path is None or path not in expected:
            if not _is_buffer(key):
                unexpected.append(key)
            continue
        want = expected[path].shape
        if tuple(value.shape) != tuple(want):
            raise CheckpointError(f"tensor {key} has shape {tuple(value.shape)}, the config expects {tuple(want)}")
        found[path] = value
    missing = sorted(".".join(p) for p in expected if p not in found)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match GPT-2 config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    tree: dict = {}
    dtype = jnp.dtype(config.param_dtype)
    for path, value in found.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = jnp.asarray(value, dtype=dtype)
    return tree


def state_from_params(params: Mapping) -> dict[str, np.ndarray]:
    """The nested parameter tree -> a flat Hugging Face state dict (``transformer.`` keys)."""
    names = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
    state = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = [k.key for k in path]
        state["transformer." + ".".join(keys[:-1] + [names[keys[-1]]])] = np.asarray(leaf)
    return state


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


def read_config(directory: Path, **overrides) -> GPT2Config:
    file = directory / "config.json"
    if not file.exists():
        raise CheckpointError(f"no config.json in {directory}")
    values = read_json(file)
    try:
        return GPT2Config.from_hf(values, **overrides)
    except ConfigError as e:  # a value of the wrong type or range
        raise CheckpointError(f"{file}: {e}") from None


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
    directory = resolve(name_or_path, allow_pickle=allow_pickle, revision=revision)
    config = read_config(directory, dtype=dtype, param_dtype=param_dtype, **config_overrides)
    params = params_from_state(read_state(directory, allow_pickle=allow_pickle), config)
    return GPT2(config, lora), params


def save_gpt2(directory: str | os.PathLike, config: GPT2Config, params: Mapping) -> Path:
    """Write ``config.json`` and ``model.safetensors`` that transformers' GPT2LMHeadModel loads."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in state_from_params(params).items()}
    if not all(np.isfinite(v).all() for v in state.values()):
        raise CheckpointError("refusing to save non-finite weights")
    save_file(state, directory / WEIGHTS, metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config.to_hf(), indent=2) + "\n")
    return directory


def save_tokenizer(tokenizer: Any, directory: str | os.PathLike) -> int:
    """Save a tokenizer beside a model; returns its end-of-text id.

    `tokenizer`: a transformers tokenizer, or jlora's (`HFTokenizer`, `ByteTokenizer`) through
    its ``hf`` form, so a byte-tokenizer model exports a tokenizer that decodes as it does.
    """
    hf = getattr(tokenizer, "hf", tokenizer)
    hf.save_pretrained(str(directory))
    return int(hf.eos_token_id)


def check_new_folder(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """`out_dir` if an export may create it (CheckpointError if a file, or a non-empty folder, is in the way)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} is a file; choose a new folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"{out_dir} exists and is not empty; choose a new folder (overwrite=True replaces it)")
    blocking = next((p for p in out_dir.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise CheckpointError(f"cannot create {out_dir}: {blocking} is a file; choose another folder")
    return out_dir


@contextlib.contextmanager
def new_folder(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling folder to write into; it becomes `out_dir` only if the block succeeds.

    So a failed export leaves nothing behind, and a replaced folder is swapped in whole.
    """
    out_dir = check_new_folder(out_dir, overwrite=overwrite)
    with made_dirs(out_dir.parent, CheckpointError):
        tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            yield tmp
            if out_dir.exists():
                shutil.rmtree(out_dir)
            tmp.rename(out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def made_dirs(path: str | os.PathLike, error: type[JloraError] = CheckpointError) -> Iterator[Path]:
    """``mkdir -p path`` for the block; if the block raises, the folders it created go again (while empty).

    A folder that cannot be created raises `error` (one line, with the OS's reason).
    """
    path = Path(path)
    created = [p for p in (path, *path.parents) if not p.exists()]  # innermost first
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise error(f"cannot create {path} ({e.strerror}); choose another folder") from None
    try:
        yield path
    except BaseException:
        with contextlib.suppress(OSError):  # rmdir only removes an empty folder: what was written stays
            for folder in created:
                folder.rmdir()
        raise
