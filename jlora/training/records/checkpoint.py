"""Orbax checkpoints of what training changes, and the identity of the base they belong to.

A run directory holds::

    RUN_DIR/config.yaml                  the resolved run config
    RUN_DIR/checkpoints/<step>/adapter   {"lora": factors, "base": trained base leaves[, "init": A0, B0]}  (Orbax)
    RUN_DIR/checkpoints/<step>/opt_state the optimizer state                              (Orbax StandardSave)
    RUN_DIR/checkpoints/<step>/meta      step, seed, LoRA config, model config, base identity (JSON)

The frozen base is never saved: it is the checkpoint the run started from, named in `meta`
with a hash of its weights. The adapters' factors are saved (A, B, DoRA's m); their scales
follow from the LoRA config in `meta`, and every loader here gives the adapters back with them
(`jlora.core.lora.adapter.with_scaling`). A PiSSA / OLoRA / LoRA-GA run trains on a residual of that base;
its checkpoints add the initial factors (``init``, the adapters at step 0), from which
`load_checkpoint` (and a resumed run) rebuilds the residual exactly as training made it
(`jlora.core.lora.residual.residual_params`). An EVA run's checkpoints keep its initial factors too: a
resumed run takes its ranks from them instead of reading the data again.
`adapter` and `meta` alone restore the adapter::

    lora, base_leaves, meta = load_adapter("RUN_DIR/checkpoints/100")        # jlora
    tree = ocp.StandardCheckpointer().restore("RUN_DIR/checkpoints/100/adapter")  # plain Orbax

Everything is saved unreplicated (host arrays), so a checkpoint written with several
devices restores on one, and the other way round.

A damaged checkpoint (a truncated or corrupt file) never ends a run in a traceback:
`restore_newest` falls back to the newest checkpoint that reads back and moves the damaged
newer ones to ``RUN_DIR/checkpoints-unreadable/<step>`` (kept, never deleted; Orbax could not
save that step again while it is in the way); if none reads back, it stops with one line and
moves nothing. `load_adapter` names the folder it cannot read.

A population run's checkpoint holds its members' adapters and optimizer states stacked (a
leading member axis) and each member's settings in ``meta["population"]``;
``load_adapter(dir, member=k)`` gives member k as an ordinary adapter. A search's checkpoints
hold every member too, the pruned ones as they were when pruned, and the search's state in
``meta["search"]``; ``member="best"`` is its winner, once the search has ranked its last members.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from jlora.core.lora.adapter import with_scaling
from jlora.core.lora.config import LoraConfig
from jlora.core.models.family import config_from_dict, family_of
from jlora.core.update.population import member_lora
from jlora.errors import BaseMismatchError, CheckpointError, RunDirError, describe
from jlora.exchange.folders import write_failure
from jlora.exchange.hf_checkpoint import load_model
from jlora.training.records.rundir import barrier, is_primary
from jlora.tree import leaves_by_path

PyTree = Any


def base_identity(name: str, params: Mapping) -> dict:
    """{"name", "sha256", "shapes"} of a base parameter tree (hashing its bytes in path order)."""
    digest = hashlib.sha256()
    shapes = {}
    for path, leaf in sorted(leaves_by_path(params).items()):
        array = np.asarray(leaf)
        digest.update(path.encode())
        digest.update(str(array.dtype).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
        shapes[path] = list(array.shape)
    return {"name": str(name), "sha256": digest.hexdigest(), "shapes": shapes}


def check_base(identity: Mapping, params: Mapping, *, allow_different_weights: bool = False) -> None:
    """Refuse a base whose shapes differ from `identity`'s, or (unless allowed) whose weights do."""
    check_identity(identity, base_identity(identity.get("name", "?"), params), allow_different_weights)


def check_identity(saved: Mapping, now: Mapping, allow_different_weights: bool = False) -> None:
    """`check_base` on an identity already computed (`base_identity`) rather than on the params."""
    wrong = [(p, s) for p, s in saved["shapes"].items() if now["shapes"].get(p) != s]
    if wrong:  # name a weight matrix rather than its bias where both differ
        path, shape = max(wrong, key=lambda item: len(item[1]))
        raise BaseMismatchError(
            f"base model does not match the adapter's: {path.rsplit('.', 1)[0]} has shape "
            f"{tuple(now['shapes'].get(path) or ())}, the adapter was trained on {tuple(shape)}"
        )
    if now["sha256"] != saved["sha256"] and not allow_different_weights:
        raise BaseMismatchError(
            f"base model weights differ from those the adapter was trained on ({saved['name']!r}, "
            f"sha256 {saved['sha256'][:12]}...); pass allow_different_weights=True to use them anyway"
        )


def open_manager(run_dir: str | Path, *, max_to_keep: int | None = 3) -> ocp.CheckpointManager:
    """The run's CheckpointManager over ``RUN_DIR/checkpoints``.

    Saves are synchronous: a run waits for each checkpoint anyway, and a save that fails then fails
    in the calling thread, where `save` turns it into one line. (Orbax's asynchronous saves fail in a
    background thread, and the threads waiting on it keep the process alive for minutes after.)
    """
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(run_dir).absolute() / "checkpoints", options=options)


def save(manager: ocp.CheckpointManager, step: int, adapter: PyTree, opt_state: PyTree, meta: Mapping) -> None:
    """Write one checkpoint, committed when this returns (so a crash never leaves it half-done).

    Raises RunDirError when the checkpoint folder cannot take it (read-only, full): the
    step's partial folder is removed and the checkpoints before it are kept, so the same command
    resumes from the newest of them once the folder is writable again.
    """
    to_host = lambda tree: jax.tree.map(np.asarray, tree)  # noqa: E731
    try:
        manager.save(
            step,
            args=ocp.args.Composite(
                adapter=ocp.args.StandardSave(to_host(adapter)),
                opt_state=ocp.args.StandardSave(to_host(opt_state)),
                meta=ocp.args.JsonSave(dict(meta)),
            ),
            force=True,
        )
        manager.wait_until_finished()
    except Exception as e:
        why = write_failure(e)  # a read-only or full folder: one line; anything else is a bug
        if why is None:
            raise
        root = Path(manager.directory)
        for partial in root.glob(f"{step}.orbax-checkpoint-tmp*"):  # Orbax's folder of the step being written
            shutil.rmtree(partial, ignore_errors=True)
        manager.reload()
        newest = manager.latest_step()
        raise RunDirError(
            f"cannot save the checkpoint of step {step} in {root} ({why}); the newest checkpoint is "
            f"{'none' if newest is None else f'step {newest}'}; make {root} writable (or free space there) and "
            "run the same command to resume"
        ) from None


def restore(manager: ocp.CheckpointManager, step: int, adapter_like: PyTree, opt_state_like: PyTree):
    """(adapter, opt_state, meta) of checkpoint `step`, with the structures of the `*_like` trees."""
    abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)  # noqa: E731
    out = manager.restore(
        step,
        args=ocp.args.Composite(
            adapter=ocp.args.StandardRestore(abstract(adapter_like)),
            opt_state=ocp.args.StandardRestore(abstract(opt_state_like)),
            meta=ocp.args.JsonRestore(),
        ),
    )
    return out["adapter"], out["opt_state"], out["meta"]


class Restored(NamedTuple):
    """What `restore_newest` read: the checkpoint's step, trees and meta, and what it set aside."""

    step: int
    adapter: PyTree
    opt_state: PyTree
    meta: dict
    set_aside: list[tuple[int, str, Path]]  # (step, why it could not be read, where it went)


def restore_newest(manager: ocp.CheckpointManager, adapter_like: PyTree, opt_state_like: PyTree) -> Restored | None:
    """The newest checkpoint that reads back (None: the run has none); see the module doc for damaged ones.

    Raises CheckpointError when there are checkpoints and none of them can be read.
    """
    failed: list[tuple[int, str]] = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            adapter, opt_state, meta = restore(manager, step, adapter_like, opt_state_like)
        except Exception as e:  # Orbax, tensorstore or JSON: a file that does not read back as written
            failed.append((step, describe(e)))
            continue
        return Restored(step, adapter, opt_state, meta, _set_aside(manager, failed))
    if failed:
        step, why = failed[0]
        raise CheckpointError(
            f"no checkpoint in {manager.directory} can be read; the newest, step {step}, fails with {why}"
        )
    return None


def _set_aside(manager: ocp.CheckpointManager, failed: list[tuple[int, str]]) -> list[tuple[int, str, Path]]:
    """Move the unreadable checkpoints out of Orbax's way, into ``checkpoints-unreadable/`` beside it."""
    if not failed:
        return []
    root = Path(manager.directory)
    moved = []
    barrier("jlora-set-aside-read")  # every process has tried to read them before one moves them
    for step, why in failed:
        target = root.parent / "checkpoints-unreadable" / str(step)
        n = 1
        while target.exists():
            n += 1
            target = target.with_name(f"{step}.{n}")
        if is_primary():
            target.parent.mkdir(parents=True, exist_ok=True)
            (root / str(step)).rename(target)
        moved.append((step, why, target))
    barrier("jlora-set-aside-moved")
    manager.reload()
    return moved


def committed_steps(run_dir: str | Path) -> list[int]:
    """The steps of a run's committed checkpoints (Orbax renames a folder to its step when complete), newest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted((int(p.name) for p in root.glob("*") if p.name.isdigit() and (p / "meta").exists()), reverse=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest committed checkpoint folder of a run, or None."""
    steps = committed_steps(run_dir)
    return Path(run_dir) / "checkpoints" / str(steps[0]) if steps else None


def find_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """The checkpoint folder of a run at `step` (None: the newest); CheckpointError if there is none."""
    run_dir = Path(run_dir)
    found = latest_checkpoint(run_dir) if step is None else run_dir / "checkpoints" / str(step)
    if found is None or not (found / "adapter").exists():
        raise CheckpointError(f"no adapter checkpoint{'' if step is None else f' at step {step}'} in {run_dir}")
    return found


def read_checkpoint(checkpoint_dir: str | Path) -> tuple[dict, dict]:
    """(the adapter item's tree {"lora", "base"[, "init"]}, meta) of one checkpoint folder."""
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / "adapter").exists():
        raise CheckpointError(f"no adapter checkpoint in {checkpoint_dir}")
    try:
        tree = ocp.StandardCheckpointer().restore((checkpoint_dir / "adapter").absolute())
        meta = json.loads(_meta_file(checkpoint_dir).read_text())
    except Exception as e:  # a truncated or corrupt file
        raise CheckpointError(f"cannot read the checkpoint in {checkpoint_dir} ({describe(e)})") from e
    return tree, meta


def load_adapter(checkpoint_dir: str | Path, member: int | str | None = None) -> tuple[dict, dict, dict]:
    """(lora, trained base leaves, meta) from one checkpoint folder; no run directory needed.

    A population run's checkpoint holds several adapters: `member` picks one (`load_member`; "best":
    a finished search's winner).
    """
    return load_member(*read_checkpoint(checkpoint_dir), member)


def read_meta(checkpoint_dir: str | Path) -> dict:
    """The meta of one checkpoint folder (step, LoRA and model config, base identity, a population's members)."""
    try:
        return json.loads(_meta_file(Path(checkpoint_dir)).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the meta of the checkpoint in {checkpoint_dir} ({describe(e)})") from e


def _meta_file(checkpoint_dir: Path) -> Path:
    meta = checkpoint_dir / "meta"
    return meta / "metadata" if meta.is_dir() else meta


def load_base(meta: Mapping, base: str | None = None, *, allow_different_weights: bool = False) -> tuple[Any, dict]:
    """The base model a checkpoint's adapter was trained on, checked (`check_base`): ``(model, params)``.

    `base` (default: the name in `meta`) is a checkpoint directory or Hub id; a random base is
    rebuilt from the recorded config and seed. `params` are the base's own, without trained leaves
    (nor a PiSSA / OLoRA run's residual: `load_checkpoint` makes that).
    """
    lora_cfg, config = lora_config_of(meta), model_config_of(meta)
    name = base or meta["base_model"]["name"]
    if name == "random":
        family = family_of(config)
        model, params = family.model(config, lora_cfg), family.random_params(meta["seed"], config)
    else:
        model, params = load_model(name, lora_cfg, dtype=config.dtype, param_dtype=config.param_dtype)
    check_base(meta["base_model"], params, allow_different_weights=allow_different_weights)
    return model, params


def load_init(checkpoint_dir: str | Path) -> dict | None:
    """The initial factors {"h": ... {"A", "B"}} a PiSSA / OLoRA / LoRA-GA / EVA checkpoint keeps (None for other
    inits)."""
    return read_checkpoint(checkpoint_dir)[0].get("init")


def find_init(run_dir: str | Path) -> dict | None:
    """A PiSSA / OLoRA / LoRA-GA / EVA run's initial factors from its newest checkpoint that reads back (None: none
    has them).

    Every checkpoint of a run keeps the same factors; a damaged newer one is passed over here
    (`restore_newest` sets it aside when the run resumes).
    """
    for step in committed_steps(run_dir):
        try:
            return load_init(Path(run_dir) / "checkpoints" / str(step))
        except CheckpointError:
            continue
    return None


def resolve_member(run_dir: str | Path, member: int | str | None) -> int | None:
    """`member` as an index: "best" is the winner the run's newest checkpoint names (`best_member`)."""
    if member != "best":
        return member
    checkpoint = find_checkpoint(run_dir)
    try:
        meta = json.loads(_meta_file(checkpoint).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the checkpoint meta in {checkpoint} ({describe(e)})") from None
    return best_member(meta)


def best_member(meta: Mapping) -> int:
    """The winner of the search whose checkpoint `meta` is; CheckpointError before its last step, or for a
    run that is not a search."""
    search = meta.get("search")
    if not search:
        raise CheckpointError("--member best: the run is not a search (no search: section); choose one with --member K")
    if search.get("best") is None:
        raise CheckpointError(
            f"--member best: the search has not ranked its last members yet (checkpoint of step {meta['step']}; "
            f"members alive: {search['alive']}); choose one with --member K"
        )
    return int(search["best"])


def lora_config_of(meta: Mapping) -> LoraConfig:
    """The `LoraConfig` a checkpoint's meta records (``meta["lora_config"]``)."""
    return LoraConfig.from_dict(meta["lora_config"])


def model_config_of(meta: Mapping) -> Any:
    """The model config a checkpoint's meta records (its family's class; GPT-2's for older checkpoints)."""
    return config_from_dict(meta["model_config"])


def load_member(tree: Mapping, meta: Mapping, member: int | str | None) -> tuple[dict, dict, dict]:
    """(adapters with their scales, trained base leaves, meta) of one adapter from a checkpoint's
    ``{"lora", "base"}`` and meta.

    A population checkpoint holds every member stacked: `member` picks one ("best": a finished
    search's winner), returned at its own rank with its own LoRA config in the meta (and
    ``meta["member"]``: its index and settings). A single adapter's checkpoint is returned as it is
    (and `member` must be None).
    """
    if member == "best":
        member = best_member(meta)
    members = meta.get("population")
    if members is None:
        if member is not None:
            raise CheckpointError(f"member={member}: the checkpoint holds one adapter, not a population")
        return with_scaling(tree["lora"], lora_config_of(meta)), tree.get("base", {}), dict(meta)
    if member is None or not 0 <= member < len(members):
        names = ", ".join(f"{k}: {m['name']}" for k, m in enumerate(members))
        given = "" if member is None else f"--member {member} is not a member: "
        raise CheckpointError(
            f"{given}the checkpoint holds a population of {len(members)} adapters; choose one with --member K "
            f"(member=K), K in 0..{len(members) - 1}: {names}"
        )
    spec = members[member]  # a Member's to_dict (jlora.training.run.members)
    lora_cfg = LoraConfig.from_dict(spec["lora_config"])
    lora = with_scaling(member_lora(tree["lora"], member, lora_cfg), lora_cfg)
    base = jax.tree.map(lambda x: x[member], tree.get("base", {}))
    return lora, base, {**meta, "lora_config": lora_cfg.to_dict(), "member": {"index": member, **spec}}
