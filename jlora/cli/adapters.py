"""Where `jlora combine` and `jlora generate --member all | --adapter` find adapters, and their base.

A source is one of::

    RUN_DIR                 its newest checkpoint; a population's members by --member (K / K,L,... / all)
    RUN_DIR/checkpoints/N   that checkpoint, the same way
    PEFT folder             adapter_config.json + adapter_model.safetensors (its base: --base, else its
                            own base/ folder, else the base_model_name_or_path it records)

and gives one `Found` adapter per member: a label, its LoraConfig and LoRA tree, its trained base
leaves (``modules_to_save``) and where its base is. A PiSSA / OLoRA adapter comes as the plain
LoRA that equals it on the unmodified base (`jlora.core.lora.residual.as_plain_lora`), so every adapter
found sits on its base as it is. `check_same_base` refuses adapters of different bases (by the
weights' hash that run checkpoints record; a PEFT folder's base is hashed when it must be compared).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from jlora.cli.members import MemberSpec, member_indices
from jlora.core.lora.config import LoraConfig
from jlora.core.lora.residual import as_plain_lora
from jlora.errors import BaseMismatchError, CheckpointError, TokenizerError, UsageError
from jlora.exchange.hf_checkpoint import load_model
from jlora.exchange.peft import ADAPTER_CONFIG, load_peft, read_adapter_config
from jlora.training.data.tokenizer import has_tokenizer_files, load_tokenizer
from jlora.training.records.checkpoint import (
    base_identity,
    find_checkpoint,
    load_adapter,
    load_base,
    load_init,
    lora_config_of,
    read_meta,
)


class Found(NamedTuple):
    """One adapter a source holds, ready to combine or to answer beside others."""

    label: str  # "runs/sweep 3 r=4,alpha=8", "out/adapter"
    cfg: LoraConfig
    lora: dict
    leaves: dict | None  # trained base leaves in the base tree's layout, or None
    base: str  # "random", a checkpoint directory or a Hub id
    meta: dict | None  # a run checkpoint's meta (its base identity; a random base is rebuilt from it)
    source: Path


def is_run(path: Path) -> bool:
    return (path / "config.yaml").exists() and (path / "checkpoints").is_dir()


def is_checkpoint(path: Path) -> bool:
    return (path / "adapter").is_dir() and (path / "meta").exists()


def find_adapters(source: str, member: MemberSpec = None, base: str | None = None) -> list[Found]:
    """The adapters of `source` (see the module doc); `member` picks a population's, `base` a PEFT folder's base."""
    path = Path(source).expanduser()
    if is_run(path) or is_checkpoint(path):
        checkpoint = find_checkpoint(path) if is_run(path) else path
        return [_from_checkpoint(checkpoint, k, path) for k in member_indices(member, read_meta(checkpoint))]
    if (path / ADAPTER_CONFIG).exists():  # one adapter, whatever `member` says
        own = path / "base"
        name = base or (
            str(own.resolve()) if own.is_dir() else read_adapter_config(path).get("base_model_name_or_path")
        )
        if not name:
            raise CheckpointError(f"{path / ADAPTER_CONFIG} names no base model; pass --base")
        cfg, lora, leaves = load_peft(path)
        return [Found(str(path), cfg, lora, leaves or None, name, None, path)]
    raise UsageError(f"{source} is not a run directory, a checkpoint or a PEFT adapter folder")


def _from_checkpoint(checkpoint: Path, member: int | None, source: Path) -> Found:
    lora, leaves, meta = load_adapter(checkpoint, member)
    cfg = lora_config_of(meta)
    if cfg.changes_base:  # trained on a residual: the equal plain LoRA on the base itself
        lora, cfg = as_plain_lora(lora, load_init(checkpoint), cfg)
    label = str(source) if member is None else f"{source} {member} {meta['member']['name']}"
    return Found(label, cfg, lora, leaves or None, meta["base_model"]["name"], meta, source)


def base_sha256(found: Found, cache: dict[str, str]) -> str:
    """The hash of `found`'s base weights: recorded by a run, computed (once per base) for a PEFT folder."""
    if found.meta is not None:
        return found.meta["base_model"]["sha256"]
    if found.base not in cache:
        cache[found.base] = base_identity(found.base, load_model(found.base)[1])["sha256"]
    return cache[found.base]


def check_same_base(found: list[Found]) -> None:
    """BaseMismatchError unless every adapter was trained on the same base weights."""
    if len({(f.meta is None, f.base) for f in found}) == 1:
        return  # the same recorded base, or the same folder / Hub id
    cache: dict[str, str] = {}
    first = found[0]
    for other in found[1:]:
        if base_sha256(other, cache) != base_sha256(first, cache):
            raise BaseMismatchError(
                f"the adapters are on different bases: {first.label} on {first.base!r}, "
                f"{other.label} on {other.base!r} (their weights differ)"
            )


def load_base_of(found: Found) -> tuple[Any, dict]:
    """(model, params) of the base `found` sits on (a run's checked against its recorded identity)."""
    if found.meta is not None:
        return load_base(found.meta)
    return load_model(found.base, lora=found.cfg)


def tokenizer_of(found: Found, override: str | None = None) -> Any:
    """The tokenizer `found` was trained with: `override`, a run's, a PEFT folder's own, else its base's.

    None when there is none to be found (a base checkpoint without tokenizer files).
    """
    if override is not None:
        return load_tokenizer(override)
    if found.meta is not None:
        source = found.meta.get("tokenizer") or found.base
    else:
        source = str(found.source) if has_tokenizer_files(found.source) else found.base
    try:
        return load_tokenizer(source)
    except TokenizerError:
        return None
