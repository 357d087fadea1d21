"""One way in: whatever a user points a command at, opened into one value.

    artifact = open_artifact("runs/sweep", member="best")   # or a checkpoint, a PEFT folder, a model
    artifact.adapters          # (TrainedAdapter(label, lora with its scales, config, leaves, init, meta), ...)
    model, params = artifact.load_base()                     # the base, checked against its recorded hash
    model, params, lora = artifact.adapters[0].on(model, params)   # trained leaves in, ready to apply

What it opens::

    RUN_DIR                  its newest checkpoint (or `step`'s)            kind "run"
    RUN_DIR/checkpoints/N    that checkpoint                                kind "checkpoint"
    PEFT folder              adapter_config.json + adapter_model.safetensors kind "peft"
                             (its base: `base`, else its own base/ folder, else the name it records)
    a model                  a checkpoint folder, a Hub id, a GGUF file     kind "model" (no adapter)

A checkpoint is read once (Orbax restores its adapter tree a single time: the factors, the trained
base leaves, a PiSSA / OLoRA run's initial factors) and `member` is resolved once, here: K, a tuple
of indices, "all", or "best" (a finished search's winner); a checkpoint of one adapter gives it
whatever `member` says. Each adapter comes with its scales (`jlora.core.lora.adapter.with_scaling`
from the config it was trained with). An adapter trained on a residual base (PiSSA / OLoRA) keeps
its initial factors: `TrainedAdapter.on` puts it on that residual, or with ``original_base=True`` turns it
into the plain LoRA that equals it on the base as it is (`jlora.core.lora.residual.as_plain_lora`).
`check_same_base` refuses adapters of different bases by their recorded weight hashes (a PEFT
folder's base is hashed when it must be compared). An adapter with a NaN or infinite number is
refused when it is opened (`check_finite`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from jlora.core.lora.config import LoraConfig
from jlora.core.lora.merge import check_fits as check_lora_fits
from jlora.core.lora.residual import as_plain_lora, residual_params
from jlora.core.models.family import family_of
from jlora.errors import BaseMismatchError, CheckpointError, UsageError
from jlora.exchange.gguf import SMOLLM2
from jlora.exchange.hf_checkpoint import is_hub_id, load_model, model_config
from jlora.exchange.peft import ADAPTER_CONFIG, load_peft, read_adapter_config
from jlora.training.records.checkpoint import (
    base_identity,
    best_member,
    find_checkpoint,
    load_base,
    load_member,
    lora_config_of,
    read_checkpoint,
    resolve_member,
)
from jlora.tree import leaves_by_path, overlay

MemberChoice = int | tuple[int, ...] | str | None  # K, (K, L, ...), "all", "best", or None: the one adapter
KINDS = ("run", "checkpoint", "peft", "model")


class TrainedAdapter(NamedTuple):
    """One adapter an artifact holds, with what it needs to sit on its base."""

    label: str  # "runs/sweep 3 r=4,alpha=8", "out/adapter"
    lora: dict  # the adapters, each with its scale
    config: LoraConfig
    leaves: dict  # trained base leaves in the base tree's layout ({}: none)
    init: dict | None = None  # a PiSSA / OLoRA run's initial factors: it trained on a residual of the base
    meta: dict | None = None  # a run checkpoint's meta (the adapter's settings, its base's identity)

    def plain(self) -> TrainedAdapter:
        """The same adapter on the base as it is: a PiSSA / OLoRA adapter as the rank-2r LoRA equal to it."""
        if self.init is None:
            return self
        lora, config = as_plain_lora(self.lora, self.init, self.config)
        return self._replace(lora=lora, config=config, init=None)

    def on(self, model: Any, params: Mapping, *, original_base: bool = False) -> tuple[Any, dict, dict]:
        """(model with this adapter's LoraConfig, params with its trained leaves and residual, its LoRA tree):
        ``model.apply({"params": params, "lora": lora}, ids)`` is the trained model."""
        adapter = self.plain() if original_base else self
        if adapter.init is not None:
            params = residual_params(params, adapter.init, adapter.config)
        return model.clone(lora=adapter.config), overlay(params, adapter.leaves), adapter.lora


@dataclasses.dataclass(frozen=True, eq=False)
class Artifact:
    """What `open_artifact` found: its kind, its adapters and where their base and tokenizer are."""

    source: Path
    kind: str  # one of KINDS
    adapters: tuple[TrainedAdapter, ...]
    base: str  # "random", a checkpoint folder, a Hub id, a GGUF file, "smollm2"
    identity: dict | None  # the base's recorded identity (a run's checkpoints record it)
    tokenizer: str | None  # where the tokenizer the adapters trained with is (None: none known)
    step: int | None = None  # a checkpoint's step

    def load_base(self, *, allow_different_weights: bool = False) -> tuple[Any, dict]:
        """(model, params) of the base, as loaded (no trained leaves): a run's rebuilt from its meta and
        checked against its recorded hash, a PEFT folder's or a model's read from `base`."""
        first = self.adapters[0] if self.adapters else None
        if first is not None and first.meta is not None:
            return load_base(first.meta, allow_different_weights=allow_different_weights)
        return load_model(self.base, lora=None if first is None else first.config)

    @cached_property
    def sha256(self) -> str:
        """The hash of the base's weights: recorded by a run, computed from the base otherwise."""
        if self.identity is not None:
            return self.identity["sha256"]
        return base_identity(self.base, self.load_base()[1])["sha256"]


def is_run(path: Path) -> bool:
    return (path / "config.yaml").exists() and (path / "checkpoints").is_dir()


def is_checkpoint(path: Path) -> bool:
    return (path / "adapter").is_dir() and (path / "meta").exists()


def open_artifact(
    source: str | Path, *, step: int | None = None, member: MemberChoice = None, base: str | None = None
) -> Artifact:
    """Open `source` (see the module doc); `member` picks a population's adapters, `base` a PEFT folder's base.

    Raises UsageError for a path that is none of the kinds, CheckpointError for one that cannot be read.
    """
    artifact = _open(source, step, member, base)
    for adapter in artifact.adapters:
        check_finite(adapter)
    return artifact


def _open(source: str | Path, step: int | None, member: MemberChoice, base: str | None) -> Artifact:
    path = Path(source).expanduser()
    if is_run(path) or is_checkpoint(path):
        checkpoint = find_checkpoint(path, step) if is_run(path) else path
        tree, meta = read_checkpoint(checkpoint)  # the one Orbax restore
        adapters = tuple(_member(tree, meta, k, path) for k in member_indices(member, meta))
        name = meta["base_model"]["name"]
        kind = "run" if is_run(path) else "checkpoint"
        return Artifact(path, kind, adapters, name, meta["base_model"], meta.get("tokenizer") or name, meta["step"])
    if (path / ADAPTER_CONFIG).exists():
        own = path / "base"
        name = base or (
            str(own.resolve()) if own.is_dir() else read_adapter_config(path).get("base_model_name_or_path")
        )
        if not name:
            raise CheckpointError(f"{path / ADAPTER_CONFIG} names no base model; pass --base")
        cfg, lora, leaves = load_peft(path)
        check_fits(str(path), lora, name)
        tokenizer = str(path) if _has_tokenizer(path) else name
        return Artifact(path, "peft", (TrainedAdapter(str(path), lora, cfg, leaves or {}),), name, None, tokenizer)
    if (
        (path / "config.json").is_file()
        or path.suffix.lower() == ".gguf"
        or str(source) == SMOLLM2
        or is_hub_id(source)
    ):
        return Artifact(path, "model", (), str(source), None, str(source))  # a folder, a GGUF file, a Hub id
    raise UsageError(f"{source} is not a run directory, a checkpoint, a PEFT adapter folder or a model")


def check_fits(label: str, lora: Mapping, base: str) -> None:
    """CheckpointError unless each adapter of `lora` fits its weight in `base` (from the base's config alone:
    no weights are read), so a PEFT folder is never combined onto, or answered by, a base of another shape."""
    config = model_config(base)
    try:
        check_lora_fits(family_of(config).param_shapes(config), lora)
    except ValueError as e:
        raise BaseMismatchError(f"{label} does not fit the base {base!r}: {e}") from None


def check_finite(adapter: TrainedAdapter) -> None:
    """CheckpointError unless every number of `adapter` is finite: a NaN or infinite weight makes every answer
    of the model NaN, and would poison a mixed batch's other rows, so it is refused where it is opened."""
    parts = {"": adapter.lora, "trained base leaf ": adapter.leaves, "initial factor ": adapter.init or {}}
    for what, tree in parts.items():
        bad = next((p for p, x in leaves_by_path(tree).items() if not np.isfinite(np.asarray(x)).all()), None)
        if bad is not None:
            raise CheckpointError(
                f"{adapter.label} holds non-finite values ({what}{bad} has NaN or infinite entries); it cannot be used"
            )


def _member(tree: Mapping, meta: Mapping, member: int | None, source: Path) -> TrainedAdapter:
    lora, leaves, own_meta = load_member(tree, meta, member)
    label = str(source) if member is None else f"{source} {member} {own_meta['member']['name']}"
    config = lora_config_of(own_meta)
    init = tree.get("init") if config.changes_base else None  # an EVA checkpoint's only serves a resume
    return TrainedAdapter(label, lora, config, leaves or {}, init, own_meta)


def _has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer.json").exists() or (
        (directory / "vocab.json").exists() and (directory / "merges.txt").exists()
    )


def member_indices(member: MemberChoice, meta: Mapping) -> list[int | None]:
    """The member indices `member` names in a checkpoint with this meta; [None]: its one adapter.

    >>> member_indices("all", {"population": [{"name": "r=1"}, {"name": "r=2"}]}), member_indices(3, {})
    ([0, 1], [None])
    """
    population = meta.get("population")
    if not population:
        return [None]
    if member == "all":
        return list(range(len(population)))
    if member == "best":
        return [best_member(meta)]
    if isinstance(member, tuple):
        return list(member)
    if member is None or isinstance(member, int):
        return [member]
    raise UsageError(f"--member {member!r}: give an index K, indices K,L,... or all / best")


def check_same_base(artifacts: Sequence[Artifact]) -> None:
    """BaseMismatchError unless every artifact's adapters were trained on the same base weights: their
    recorded hashes when both record one, else the hash of the weights (each base loaded once)."""
    first = artifacts[0]
    for other in artifacts[1:]:
        if other.identity is None and first.identity is None and other.base == first.base:
            continue  # the same folder or Hub id
        if other.sha256 != first.sha256:
            raise BaseMismatchError(
                f"the adapters are on different bases: {first.adapters[0].label} on {first.base!r}, "
                f"{other.adapters[0].label} on {other.base!r} (their weights differ)"
            )


def load_checkpoint(
    checkpoint_dir: str | Path,
    base: str | None = None,
    *,
    allow_different_weights: bool = False,
    member: int | str | None = None,
    original_base: bool = False,
):
    """An adapter checkpoint on its base model, ready to apply: ``(model, params, lora, lora_cfg, meta)``.

    Needs nothing but the checkpoint folder (its ``adapter`` and ``meta``) and the base model:
    `base` is a Hugging Face checkpoint directory or Hub id (default: the name recorded at save
    time); a run on a random base is rebuilt from the recorded config and seed. The base is
    checked against the recorded identity (shapes always, weights unless `allow_different_weights`),
    and the trained base leaves are put into `params`. `member` picks one adapter of a population
    run's checkpoint ("best": a finished search's winner).

    A PiSSA / OLoRA run's `params` are the residual base it trained on, rebuilt from the
    checkpoint's initial factors; with `original_base` they are the unmodified base instead,
    and the adapter comes converted to the rank-2r LoRA that equals it there (as exported to
    PEFT). Either way ``model.apply({"params": params, "lora": lora}, ids)`` is the trained model.
    """
    artifact = open_artifact(checkpoint_dir, member=member)
    (adapter,) = artifact.adapters
    if base is None:
        model, params = artifact.load_base(allow_different_weights=allow_different_weights)
    else:
        model, params = load_base(adapter.meta, base, allow_different_weights=allow_different_weights)
    model, params, lora = adapter.on(model, params, original_base=original_base)
    return model, params, lora, model.lora, adapter.meta


def load_run(
    run_dir: str | Path,
    step: int | None = None,
    *,
    allow_different_weights: bool = False,
    member: int | str | None = None,
    original_base: bool = False,
):
    """`load_checkpoint` of a run's newest checkpoint (or of `step`; of population member `member`:
    "best" is a search's winner, as its newest checkpoint names it, at `step` too)."""
    checkpoint = find_checkpoint(run_dir, step)
    if member == "best":
        member = resolve_member(run_dir, member)
    return load_checkpoint(
        checkpoint, allow_different_weights=allow_different_weights, member=member, original_base=original_base
    )
