"""Hugging Face PEFT adapter folders <-> jlora's LoRA tree, both ways, for every model family.

A PEFT LoRA folder holds two files::

    adapter_config.json        r, lora_alpha, target_modules, rank_pattern, alpha_pattern, use_rslora, ...
    adapter_model.safetensors  base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight  (r, d_in)   GPT-2
                               base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight (d_out, r)  Llama
                               base_model.model.transformer.ln_f.weight, ...   (modules_to_save, whole)

The family (`jlora.core.models.family`) comes from the module paths (their blocks' node, ``h`` or
``layers``); it gives the base model's prefix in the tensor names and the modules PEFT may target.

A and B travel as they are: PEFT keeps them in the maths' (out, in) layout (for GPT-2 although its
Conv1D weight is (in, out): ``fan_in_fan_out`` true there, false for the Llama family). A DoRA
adapter (``use_dora: true``) adds its magnitude, ``...c_attn.lora_magnitude_vector`` (d_out,), also
as it is (one value per output feature, whatever the layout). Three things need translating:

- q/k/v slice adapters (``target_modules=("c_attn.q", "c_attn.v")``) have no PEFT name. They
  go out as one c_attn adapter of rank r_q + r_v: A stacked, B block-structured with zeros
  where a slice's rows are not its own, and the alpha chosen so the scaling is unchanged::

      A = [A_q; A_v]          (r_q + r_v, D)
      B = [[B_q, 0], [0, 0], [0, B_v]]     (3D, r_q + r_v)

  jlora's own config rides along in the safetensors metadata, so `load_peft` splits such a
  folder back into the slices it came from (exactly) as long as PEFT did not change it.
- trained base leaves (``{"ln_f": {"scale", "bias"}}``, the base tree's layout) go out as
  PEFT's ``modules_to_save``: whole modules under their checkpoint names.
- a PiSSA / OLoRA adapter trained on a residual base goes out as PEFT shares one
  (``path_initial_model_for_weight_conversion``): an ordinary rank-2r LoRA on the unmodified
  base (`jlora.core.lora.residual.as_plain_lora`), so `save_peft` needs the initial factors.
  PEFT folders still holding such an init (unconverted) are refused: their base is not the
  one PEFT users load.

`save_peft` checks everything before it writes, writes into a hidden sibling folder and
renames it at the end, so an error never leaves a partial folder.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from jlora.core.lora.adalora import AdaLoraConfig, as_plain, kept
from jlora.core.lora.adapter import (
    SCALE,
    adapters_by_module,
    flatten_adapters,
    scaling_of,
    split_slice,
    unflatten_adapters,
    with_scaling,
)
from jlora.core.lora.config import (
    QKV,
    LoraConfig,
    block_of,
    is_regex,
    layers_and_kinds,
    module_kind,
    pattern_value,
    short_names,
    targets_for,
)
from jlora.core.lora.residual import as_plain_lora
from jlora.core.models.family import FAMILIES, Family, family_of_paths, module_paths_of
from jlora.errors import CheckpointError, describe
from jlora.exchange.folders import new_folder
from jlora.exchange.hf_checkpoint import read_json, save_tokenizer
from jlora.tree import path_names

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"
PREFIX = "base_model.model."
JLORA_METADATA = "jlora_lora_config"
PEFT_NAMES = {"A": "lora_A.weight", "B": "lora_B.weight", "m": "lora_magnitude_vector"}  # adapter leaf -> PEFT
# LoRA variants whose init rewrites the base weights (or whose forward is not W x + s B A x):
# the adapter alone does not describe the model.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")


def savable_leaves(family: Family, last: str) -> list[set[str]]:
    """The leaf sets that make base module `last` (its last name) whole for PEFT's modules_to_save: norms and
    position embeddings as the family lists them, a linear module its kernel with its bias (GPT-2's always
    have one; a Llama-family module may not)."""
    if last in family.savable:
        return [set(family.savable[last])]
    if last in {m.split(".")[-1] for m in family.modules}:
        return [{"kernel", "bias"}] if family.name == "gpt2" else [{"kernel"}, {"kernel", "bias"}]
    return []


class PeftAdapter(NamedTuple):
    """What `load_peft` returns: ``config, lora, modules_to_save = load_peft(dir)``."""

    config: LoraConfig
    lora: dict
    modules_to_save: dict | None  # trained base leaves in the base tree's layout, or None


# ---------------------------------------------------------------------------------------------
# export


def _fuse_slices(path: str, adapters: Mapping[str, Mapping]) -> tuple[np.ndarray, np.ndarray, float]:
    """q/k/v slice adapters of one fused module -> (A (R, D), B (3D, R), scaling), R = sum of ranks."""
    parts = [(p, adapters[p]) for p in (f"{path}.{s}" for s in QKV) if p in adapters]
    scalings = [float(scaling_of(a, p)) for p, a in parts]
    width = parts[0][1]["B"].shape[0]
    rank = sum(a["A"].shape[0] for _, a in parts)
    a_fused = np.concatenate([np.asarray(a["A"], np.float32) for _, a in parts])
    b_fused = np.zeros((len(QKV) * width, rank), np.float32)
    col = 0
    for (p, a), s in zip(parts, scalings, strict=True):
        r = a["A"].shape[0]
        row = QKV.index(p.rsplit(".", 1)[1]) * width
        # One scaling per PEFT module: a slice with another scale carries the ratio in its B.
        b_fused[row : row + width, col : col + r] = np.asarray(a["B"], np.float32) * np.float32(s / scalings[0])
        col += r
    return a_fused, b_fused, scalings[0]


def _path_order(path: str) -> tuple[int, int]:
    """Sort key of "<blocks>.{i}.{kind}" paths: block, then module, as in the checkpoint."""
    family = family_of_paths([path])
    return block_of(path), family.modules.index(module_kind(path))


def _alpha(scaling: float, rank: int, rslora: bool, written: float) -> float:
    """PEFT's lora_alpha for an adapter of this scale and rank: scaling * r (rsLoRA: * sqrt(r)); `written`
    (the config's alpha) where the two agree to the scale's float32 rounding, so the file keeps its digits."""
    alpha = scaling * (math.sqrt(rank) if rslora else rank)
    return written if math.isclose(alpha, written, rel_tol=1e-6) else alpha


def _peft_modules(lora: Mapping, cfg: LoraConfig) -> dict[str, tuple[dict[str, np.ndarray], float]]:
    """{PEFT module path: ({"A", "B"[, "m"]}, alpha)} with slices fused, in path order; each alpha from the
    scale the adapter carries."""
    modules = {}
    for module, adapters in sorted(adapters_by_module(lora).items(), key=lambda item: _path_order(item[0])):
        if module in adapters and len(adapters) > 1:
            raise CheckpointError(f"{module} has an adapter and slice adapters; PEFT has one adapter per module")
        if module in adapters:
            adapter = adapters[module]
            tensors = {name: np.asarray(leaf, np.float32) for name, leaf in adapter.items() if name != SCALE}
            scaling, rank = float(scaling_of(adapter, module)), adapter["A"].shape[0]
            modules[module] = (tensors, _alpha(scaling, rank, cfg.rslora, cfg.alpha_for(module)))
            continue
        a, b, scaling = _fuse_slices(module, adapters)
        rank = a.shape[0]
        modules[module] = ({"A": a, "B": b}, scaling * (math.sqrt(rank) if cfg.rslora else rank))
    return modules


def _every_layer(targets: Any, layers: Any = None) -> bool:
    """Whether target names select their modules in every block (no index, no regex, no layer list)."""
    if layers is not None or not isinstance(targets, list | tuple):
        return False
    return not any(is_regex(t) or any(p.isdigit() for p in t.split(".")) for t in targets)


def _target_modules(paths: list[str], cfg: LoraConfig) -> list[str]:
    """PEFT target names for these module paths: short suffixes when `cfg` adapts every block alike."""
    by_layer = layers_and_kinds(paths)
    kinds = set.union(*by_layer.values())
    if _every_layer(cfg.target_modules, cfg.layers) and all(s == kinds for s in by_layer.values()):
        return short_names(kinds)
    # PEFT matches "h.3.attn.c_attn" against "transformer.h.3.attn.c_attn" by suffix, so only that module.
    return list(paths)


def _check_savable(modules_to_save: Mapping, adapted: set[str], family: Family) -> list[str]:
    """Module paths of the trained base leaves; each must be a whole module PEFT can save."""
    leaves = collections.defaultdict(set)
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(modules_to_save):
        if leaf is None:
            continue
        names = path_names(key_path)
        leaves[".".join(names[:-1])].add(names[-1])
    for module, names in leaves.items():
        last = module.split(".")[-1]
        if last == family.embedding:
            raise CheckpointError(
                f"a trained {last} cannot go out as a PEFT adapter: PEFT's modules_to_save does not keep the "
                "LM head tied to it; export the merged model instead"
            )
        if module in adapted:
            raise CheckpointError(f"{module} carries an adapter and is trained in full; PEFT cannot save both")
        if names not in savable_leaves(family, last):
            raise CheckpointError(
                f"trained base leaves {sorted(names)} of {module} are not a whole module; PEFT saves whole modules "
                "(modules_to_save) and its bias options cannot be written exactly: export the merged model instead"
            )
    return sorted(leaves)


def peft_config(
    lora: Mapping,
    cfg: LoraConfig,
    *,
    base_model_name_or_path: str | None,
    modules_to_save: Mapping | None = None,
) -> dict:
    """The ``adapter_config.json`` dict PEFT needs to rebuild this adapter on its base model."""
    modules = _peft_modules(lora, cfg)
    if not modules:
        raise CheckpointError("the LoRA tree has no adapters; nothing to export")
    family = family_of_paths(modules)
    if cfg.changes_base:
        raise CheckpointError(
            f"a LoRA init {cfg.init!r} adapter works on a residual base: convert it first "
            "(jlora.core.lora.residual.as_plain_lora, or save_peft(..., init=initial factors))"
        )
    ranks = {m: t["A"].shape[0] for m, (t, _) in modules.items()}
    alphas = {m: alpha for m, (_, alpha) in modules.items()}
    # The most common rank and alpha become r and lora_alpha; the rest go to the patterns.
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    saved = _check_savable(modules_to_save or {}, set(modules), family)
    plain = lambda x: int(x) if float(x).is_integer() else float(x)  # noqa: E731
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(r),
        "lora_alpha": plain(alpha),
        "lora_dropout": cfg.dropout,
        "target_modules": _target_modules(list(modules), cfg),
        "rank_pattern": {m: int(k) for m, k in ranks.items() if k != r},
        "alpha_pattern": {m: plain(a) for m, a in alphas.items() if a != alpha},
        "use_rslora": cfg.rslora,
        "fan_in_fan_out": family.name == "gpt2",  # GPT-2's Conv1D stores its weight (in, out)
        "bias": "none",
        "modules_to_save": saved or None,
        "init_lora_weights": "gaussian" if cfg.init == "gaussian" else True,
        "use_dora": cfg.use_dora,
        "inference_mode": True,
    }


def save_peft(
    out_dir: str | os.PathLike,
    lora: Mapping,
    cfg: LoraConfig,
    *,
    base_model_name_or_path: str | None,
    modules_to_save: Mapping | None = None,
    tokenizer: Any = None,
    init: Mapping | None = None,
    overwrite: bool = False,
    adalora: AdaLoraConfig | None = None,
    as_lora: bool = False,
) -> Path:
    """Write `lora` as a PEFT LoRA folder that ``PeftModel.from_pretrained(base, out_dir)`` loads: `write_peft`
    into a new folder `out_dir` (an existing non-empty one needs `overwrite`), whole or not at all
    (`jlora.exchange.folders.new_folder`)."""
    with new_folder(out_dir, overwrite=overwrite) as tmp:
        write_peft(
            tmp,
            lora,
            cfg,
            base_model_name_or_path=base_model_name_or_path,
            modules_to_save=modules_to_save,
            tokenizer=tokenizer,
            init=init,
            adalora=adalora,
            as_lora=as_lora,
        )
    return Path(out_dir)


def write_peft(
    folder: Path,
    lora: Mapping,
    cfg: LoraConfig,
    *,
    base_model_name_or_path: str | None,
    modules_to_save: Mapping | None = None,
    tokenizer: Any = None,
    init: Mapping | None = None,
    adalora: AdaLoraConfig | None = None,
    as_lora: bool = False,
) -> None:
    """The files of a PEFT LoRA folder, written into the existing (empty) `folder`.

    Args:
      folder: where the files go (a `new_folder` block's folder: `save_peft` is that).
      lora: the adapters, ``{"A": (r, d_in), "B": (d_out, r), "scaling": ()[, "m": (d_out,)]}`` per module
        (slices allowed, DoRA's m with whole modules); PEFT's alphas are made from their scales.
      cfg: their `LoraConfig` (targets, dropout, rsLoRA, init, DoRA).
      base_model_name_or_path: what PEFT records as the base (a Hub id or a directory).
      modules_to_save: trained base leaves in the base tree's layout, e.g.
        ``{"ln_f": {"scale": (D,), "bias": (D,)}}``; whole modules only.
      tokenizer: saved beside the adapter (`jlora.exchange.hf_checkpoint.save_tokenizer`), so the
        folder carries the tokenizer the adapter was trained with (None: none).
      init: for a PiSSA / OLoRA adapter (``cfg.changes_base``), its initial factors A0, B0:
        the folder then holds the rank-2r LoRA on the unmodified base that equals it.
      adalora: for an AdaLoRA adapter (``cfg.init == "adalora"``), the run's ``adalora:`` section: the folder is
        PEFT's AdaLoRA format (``peft_type: ADALORA``, `write_adalora`).
      as_lora: an AdaLoRA adapter goes out instead as the plain LoRA equal to it, its kept triplets'
        ranks in ``rank_pattern`` (`adalora_as_lora`).

    Raises:
      CheckpointError: something PEFT cannot represent, or non-finite values, before anything is written.
    """
    from safetensors.numpy import save_file

    if cfg.init == "adalora":
        if not as_lora:
            if adalora is None:
                raise CheckpointError("an AdaLoRA adapter needs its adalora: settings (adalora=) for PEFT's format")
            args = dict(base_model_name_or_path=base_model_name_or_path, modules_to_save=modules_to_save)
            return write_adalora(folder, lora, cfg, adalora, tokenizer=tokenizer, **args)
        lora, cfg = adalora_as_lora(lora, cfg)
    if cfg.changes_base:
        if init is None:
            raise CheckpointError(
                f"a LoRA init {cfg.init!r} adapter needs its initial factors (init=) to be written against "
                "the unmodified base"
            )
        lora, cfg = as_plain_lora(lora, init, cfg)
    config = peft_config(lora, cfg, base_model_name_or_path=base_model_name_or_path, modules_to_save=modules_to_save)
    tensors = {}
    modules = _peft_modules(lora, cfg)
    family = family_of_paths(modules)
    for module, (adapter, _) in modules.items():
        for name, leaf in adapter.items():
            tensors[f"{PREFIX}{family.hf_prefix}{module}.{PEFT_NAMES[name]}"] = np.ascontiguousarray(leaf)
    trained = {k: v for k, v in (modules_to_save or {}).items() if v is not None}
    for key, value in family.state_from_params(trained).items():
        tensors[PREFIX + key] = np.ascontiguousarray(np.asarray(value, np.float32))
    bad = [k for k, v in tensors.items() if not np.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"refusing to export non-finite values in {', '.join(bad[:3])}")
    metadata = {"format": "pt", JLORA_METADATA: json.dumps(cfg.to_dict())}
    save_file(tensors, folder / ADAPTER_WEIGHTS, metadata=metadata)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder)


# ---------------------------------------------------------------------------------------------
# AdaLoRA (peft_type ADALORA): A, E, B as parameters, pruned by a rank pattern


def adalora_as_lora(lora: Mapping, cfg: LoraConfig) -> tuple[dict, LoraConfig]:
    """An AdaLoRA tree as the plain LoRA equal to it: A' = diag(E) A on the kept triplets, B on theirs, each
    module's rank and alpha (its scale times that rank) in the patterns; a module with none left is dropped."""
    plain, ranks = as_plain(lora)
    kept = [p for p, r in ranks.items() if r > 0]
    if not kept:
        raise CheckpointError("every AdaLoRA triplet is masked (E = 0 everywhere); there is no update to export")
    scale = {p: float(scaling_of(a, p)) for p, a in flatten_adapters(plain).items()}
    targets = {} if len(kept) == len(ranks) else targets_for(kept, every_layer=False)
    plain_cfg = cfg.replace(
        init="kaiming",
        rank_pattern={p: ranks[p] for p in kept},
        alpha_pattern={p: scale[p] * ranks[p] for p in kept},
        **targets,
    )
    return plain, plain_cfg


def adalora_config(
    lora: Mapping, cfg: LoraConfig, adalora: AdaLoraConfig, *, base_model_name_or_path: str | None, saved: list
) -> dict:
    """The ``adapter_config.json`` of PEFT's AdaLoRA: its schedule keys, lora_alpha, and the rank pattern (every
    module's mask over its init_r triplets, under ``<module>.lora_E``) that sizes the saved tensors."""
    family = family_of_paths(list(flatten_adapters(lora)))
    pattern = {f"{family.hf_prefix}{p}.lora_E": np.asarray(kept(a)).tolist() for p, a in flatten_adapters(lora).items()}
    paths = list(flatten_adapters(lora))
    return {
        "peft_type": "ADALORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "init_r": cfg.r,
        "target_r": adalora.target_r,
        "tinit": adalora.tinit,
        "tfinal": adalora.tfinal,
        "deltaT": adalora.deltaT,
        "beta1": adalora.beta1,
        "beta2": adalora.beta2,
        "orth_reg_weight": adalora.orth_reg_weight,
        "total_step": adalora.total_step or None,
        "lora_alpha": int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": _target_modules(paths, cfg),
        "rank_pattern": pattern,
        "fan_in_fan_out": family.name == "gpt2",
        "bias": "none",
        "modules_to_save": saved or None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def write_adalora(
    folder: Path,
    lora: Mapping,
    cfg: LoraConfig,
    adalora: AdaLoraConfig,
    *,
    base_model_name_or_path: str | None,
    modules_to_save: Mapping | None = None,
    tokenizer: Any = None,
) -> None:
    """Write an AdaLoRA tree into `folder` in PEFT's format: ``<module>.lora_A`` (k, d_in), ``.lora_E`` (k, 1),
    ``.lora_B`` (d_out, k) for the k kept triplets (`jlora.core.lora.adalora.kept`), as PEFT's
    ``save_pretrained`` prunes them."""
    from safetensors.numpy import save_file

    adapters = flatten_adapters(lora)
    if adalora.total_step is None:
        raise CheckpointError("PEFT's AdaLoRA needs total_step: give the run's (adalora.total_step)")
    family = family_of_paths(list(adapters))
    saved = _check_savable(modules_to_save or {}, set(adapters), family)
    config = adalora_config(lora, cfg, adalora, base_model_name_or_path=base_model_name_or_path, saved=saved)
    tensors = {}
    for path, adapter in adapters.items():
        keep = np.asarray(kept(adapter))
        name = f"{PREFIX}{family.hf_prefix}{path}"
        tensors[f"{name}.lora_A"] = np.asarray(adapter["A"], np.float32)[keep]
        tensors[f"{name}.lora_E"] = np.asarray(adapter["E"], np.float32)[keep][:, None]
        tensors[f"{name}.lora_B"] = np.asarray(adapter["B"], np.float32)[:, keep]
    trained = {k: v for k, v in (modules_to_save or {}).items() if v is not None}
    for key, value in family.state_from_params(trained).items():
        tensors[PREFIX + key] = np.asarray(value, np.float32)
    bad = [k for k, v in tensors.items() if not np.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"refusing to export non-finite values in {', '.join(bad[:3])}")
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    save_file(tensors, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder)


def load_adalora(directory: Path, config: Mapping) -> PeftAdapter:
    """A PEFT AdaLoRA folder as jlora's: each module's kept triplets back at their places among its init_r, the
    masked ones 0 (E = 0: no update), so the tree has the shapes AdaLoRA trains with."""
    tensors, _ = _read_tensors(directory)
    flat, trained = _sort_tensors(tensors, directory / ADAPTER_WEIGHTS, dora=False)
    file = directory / ADAPTER_CONFIG
    init_r, alpha = _number(config, "init_r", file, int), _number(config, "lora_alpha", file)
    family = family_of_paths(list(flat))
    pattern = config.get("rank_pattern") or {}
    lora = {}
    for path, adapter in flat.items():
        keep = np.asarray(pattern.get(f"{family.hf_prefix}{path}.lora_E", [True] * init_r), bool)
        if keep.shape != (init_r,) or int(keep.sum()) != adapter["A"].shape[0] or "E" not in adapter:
            raise CheckpointError(
                f"AdaLoRA adapter {path}: lora_A {adapter['A'].shape} does not fit its rank pattern "
                f"over init_r={init_r}"
            )
        a = np.zeros((init_r, adapter["A"].shape[1]), np.float32)
        b = np.zeros((adapter["B"].shape[0], init_r), np.float32)
        e = np.zeros((init_r,), np.float32)
        a[keep], b[:, keep], e[keep] = adapter["A"], adapter["B"], adapter["E"].reshape(-1)
        lora[path] = {"A": a, "E": e, "B": b}
    every_layer = _every_layer(config.get("target_modules"), config.get("layers_to_transform"))
    cfg = LoraConfig(
        r=init_r,
        alpha=alpha,
        dropout=float(config.get("lora_dropout") or 0.0),
        init="adalora",
        **targets_for(list(lora), every_layer),
    )
    if cfg.module_paths(_model_paths(lora)) != tuple(lora):
        raise CheckpointError(f"cannot express the adapters of {directory} as a LoraConfig")
    lora = with_scaling(_to_jax(unflatten_adapters(lora)), cfg)
    return PeftAdapter(cfg, lora, _to_jax(trained or None))


# ---------------------------------------------------------------------------------------------
# import


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """The ``adapter_config.json`` of a PEFT folder, or CheckpointError."""
    file = Path(directory) / ADAPTER_CONFIG
    if not file.exists():
        raise CheckpointError(f"no {ADAPTER_CONFIG} in {directory}: not a PEFT adapter folder")
    return read_json(file)


def _number(config: Mapping, key: str, file: Path, kind: type = float) -> Any:
    """``config[key]`` as a positive `kind` (int or float), or a CheckpointError naming the file and field."""
    if key not in config:
        raise CheckpointError(f"{file} lacks {key!r}, which a LoRA adapter needs")
    value = config[key]
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok or (kind is int and value != int(value)):
        raise CheckpointError(f"{file}: {key!r} must be a positive {kind.__name__}, got {value!r}")
    return kind(value)


def _check_supported(config: Mapping) -> None:
    def refuse(ok: bool, what: str) -> None:
        if not ok:
            raise CheckpointError(f"unsupported PEFT adapter: {what}; jlora reads plain LoRA adapters")

    refuse(config.get("peft_type") == "LORA", f"peft_type {config.get('peft_type')!r}")
    refuse(config.get("bias", "none") == "none", f"bias {config.get('bias')!r} (only 'none')")
    refuse(not config.get("lora_bias"), "lora_bias")
    init = config.get("init_lora_weights", True)
    refuse(
        not (isinstance(init, str) and init.startswith(BASE_CHANGING_INITS)),
        f"init_lora_weights {init!r} changes the base weights (save it from PEFT with "
        "path_initial_model_for_weight_conversion=... for a LoRA on the unmodified base)",
    )
    for key in ("layer_replication", "trainable_token_indices", "target_parameters", "alora_invocation_tokens"):
        refuse(not config.get(key), f"{key}={config.get(key)!r}")
    for key in ("use_qalora", "use_bdlora"):
        refuse(not config.get(key), key)


def _read_tensors(directory: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import safe_open

    file = directory / ADAPTER_WEIGHTS
    if not file.exists():
        if (directory / PICKLE_WEIGHTS).exists():
            raise CheckpointError(
                f"{directory / PICKLE_WEIGHTS} is a pickle (loading one can run code); re-save the adapter with "
                "safetensors (PEFT's default, save_pretrained(..., safe_serialization=True))"
            )
        raise CheckpointError(f"no {ADAPTER_WEIGHTS} in {directory}")
    try:
        with safe_open(file, "flax") as f:  # the flax view reads bfloat16 too; take float32 once
            tensors = {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}
            return tensors, f.metadata() or {}
    except Exception as e:  # safetensors' own error: a truncated or corrupt file
        raise CheckpointError(f"cannot read {file} ({describe(e)}); is it truncated or corrupt?") from None


def _adapter_key(key: str) -> tuple[str, str] | None:
    """PEFT tensor name -> (module path, "A", "B", "m" or AdaLoRA's "E"), e.g. ("h.0.attn.c_attn", "A"); None: not
    LoRA. AdaLoRA's factors are parameters, not layers: ``...c_attn.lora_A`` without ``.weight``."""
    m = re.fullmatch(
        r"(?:base_model\.model\.)?(?:transformer\.|model\.)?(.+)\.(lora_A|lora_B|lora_E"
        r"|lora_magnitude_vector)(?:\.weight)?",  # older PEFT saved the magnitude as ...lora_magnitude_vector.weight
        key,
    )
    if not m:
        return None
    return m.group(1), {"lora_A": "A", "lora_B": "B", "lora_E": "E", "lora_magnitude_vector": "m"}[m.group(2)]


def _as_jlora_slices(flat: dict, cfg: LoraConfig) -> dict | None:
    """Undo `_fuse_slices` for every module `cfg` adapts in slices; None if the tensors say otherwise."""
    wanted = cfg.module_paths(_model_paths(flat))
    fused_modules = {split_slice(p)[0] for p in wanted}
    if fused_modules != set(flat):
        return None
    out = {}
    for module in sorted(fused_modules, key=_path_order):
        slices = [p for p in wanted if split_slice(p)[0] == module]
        a, b = np.asarray(flat[module]["A"]), np.asarray(flat[module]["B"])
        if slices == [module]:
            out[module] = dict(flat[module])
            continue
        ranks = [cfg.rank_for(p) for p in slices]
        width = b.shape[0] // len(QKV)
        if sum(ranks) != a.shape[0] or b.shape[0] != len(QKV) * width:
            return None
        scalings = [cfg.scaling_for(p) for p in slices]
        expected = np.zeros_like(b)
        col = 0
        for p, r, s in zip(slices, ranks, scalings, strict=True):
            row = QKV.index(p.rsplit(".", 1)[1]) * width
            block = b[row : row + width, col : col + r]
            out[p] = {"A": a[col : col + r], "B": block if s == scalings[0] else block * np.float32(scalings[0] / s)}
            expected[row : row + width, col : col + r] = block
            col += r
        if not np.array_equal(expected, b):  # PEFT trained the zero blocks: it is a c_attn adapter now
            return None
    return out


def _model_paths(flat: Mapping[str, Any]) -> tuple[str, ...]:
    """Every adaptable module path of the model these adapters' paths come from (as deep as their deepest block)."""
    return module_paths_of(family_of_paths(flat), 1 + max(block_of(p) for p in flat))


def _family(path: str) -> Family | None:
    """The family whose adaptable modules include `path` ("<blocks>.<i>.<module>"), or None."""
    parts = path.split(".")
    for family in FAMILIES:
        if len(parts) > 2 and parts[0] == family.blocks and parts[1].isdigit() and module_kind(path) in family.modules:
            return family
    return None


def _sort_tensors(tensors: Mapping[str, np.ndarray], file: Path, dora: bool) -> tuple[dict, dict]:
    """PEFT tensors -> ({module path: {"A", "B"[, "m"]}}, trained base leaves in the base tree's layout)."""
    flat: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    trained: dict = {}
    family = None
    for key in sorted(tensors, key=lambda k: _adapter_key(k) is None):  # adapters first: their errors say more
        adapter = _adapter_key(key)
        if adapter is not None:
            path, which = adapter
            family = family or _family(path)
            if family is None or _family(path) is not family:
                valid = "; ".join(", ".join(f"{f.blocks}.<i>.{k}" for k in f.modules) for f in FAMILIES)
                raise CheckpointError(f"unsupported PEFT target {path!r} (tensor {key}); jlora adapts {valid}")
            flat[path][which] = tensors[key]
            continue
        base_path = None if family is None else family.hf_key_to_path(key.removeprefix(PREFIX))
        if base_path is None:
            raise CheckpointError(f"unsupported tensor {key} in {file} (not a LoRA A/B or a modules_to_save weight)")
        node = trained
        for name in base_path[:-1]:
            node = node.setdefault(name, {})
        node[base_path[-1]] = family.from_hf(base_path, tensors[key])
    if not flat:
        raise CheckpointError(f"no LoRA tensors (lora_A / lora_B) in {file}")
    for path, adapter in flat.items():
        if {"A", "B"} - set(adapter) or adapter["A"].shape[0] != adapter["B"].shape[1]:
            raise CheckpointError(
                f"adapter {path}: lora_A {getattr(adapter.get('A'), 'shape', None)} and "
                f"lora_B {getattr(adapter.get('B'), 'shape', None)} are not a rank-r pair"
            )
        if ("m" in adapter) != dora or ("m" in adapter and adapter["m"].shape != adapter["B"].shape[:1]):
            raise CheckpointError(
                f"adapter {path}: lora_magnitude_vector {getattr(adapter.get('m'), 'shape', None)} does not fit "
                f"{ADAPTER_CONFIG}'s use_dora={dora} and lora_B {adapter['B'].shape}"
            )
    return {p: flat[p] for p in sorted(flat, key=_path_order)}, trained


def load_peft(directory: str | os.PathLike) -> PeftAdapter:
    """A PEFT LoRA folder (saved by PEFT or by `save_peft`) as jlora's config, LoRA tree and trained leaves.

    Returns:
      ``(config, lora, modules_to_save)``: a `LoraConfig` whose scalings are PEFT's for every
      module (rank_pattern, alpha_pattern, use_rslora and use_dora included), the adapters
      ``{"A": (r, d_in), "B": (d_out, r), "scaling": ()[, "m": (d_out,)]}`` in float32 with the scales it
      gives, and the ``modules_to_save`` leaves in the base tree's layout (None if there are none).

    Raises:
      CheckpointError: not a PEFT LoRA folder, or options jlora does not support (other PEFT
        types, bias training, an unconverted PiSSA / OLoRA init, targets outside a family's
        attention and MLP projections, ...).
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    if config.get("peft_type") == "ADALORA":
        return load_adalora(directory, config)
    _check_supported(config)
    tensors, metadata = _read_tensors(directory)

    flat, trained = _sort_tensors(tensors, directory / ADAPTER_WEIGHTS, bool(config.get("use_dora")))
    paths = list(flat)
    modules_to_save = trained or None

    if JLORA_METADATA in metadata:  # written by save_peft: give back the slices and config it came from
        original = _written_config(metadata[JLORA_METADATA], directory / ADAPTER_WEIGHTS)
        lora = _as_written(flat, config, original, modules_to_save)
        if lora is not None:
            return PeftAdapter(original, with_scaling(lora, original), _to_jax(modules_to_save))

    file = directory / ADAPTER_CONFIG
    r, alpha = _number(config, "r", file, int), _number(config, "lora_alpha", file)
    rslora = bool(config.get("use_rslora", False))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    ranks, alphas = {}, {}
    for path, adapter in flat.items():
        name = family_of_paths(flat).hf_prefix + path  # the module name PEFT matches its patterns against
        ranks[path] = int(pattern_value(rank_pattern, name, r))
        alphas[path] = float(pattern_value(alpha_pattern, name, alpha))
        if adapter["A"].shape[0] != ranks[path]:
            raise CheckpointError(
                f"adapter {path} has rank {adapter['A'].shape[0]} in {ADAPTER_WEIGHTS}, "
                f"but {ADAPTER_CONFIG} gives it rank {ranks[path]}"
            )
    # PEFT adapted these kinds in every block: so do we, whatever the base's depth.
    every_layer = _every_layer(config.get("target_modules"), config.get("layers_to_transform"))
    every_layer = every_layer and not config.get("exclude_modules")
    init = "gaussian" if config.get("init_lora_weights") == "gaussian" else "kaiming"
    cfg = LoraConfig(
        r=r,
        alpha=alpha,
        dropout=float(config.get("lora_dropout") or 0.0),
        rslora=rslora,
        init=init,
        rank_pattern={p: k for p, k in ranks.items() if k != r},
        alpha_pattern={p: a for p, a in alphas.items() if a != alpha},
        use_dora=bool(config.get("use_dora")),
        **targets_for(paths, every_layer),
    )
    same = cfg.module_paths(_model_paths(flat)) == tuple(paths) and all(
        cfg.rank_for(p) == ranks[p] and cfg.alpha_for(p) == alphas[p] for p in paths
    )
    if not same:  # a safety net: the config must select these modules and give each PEFT's scaling
        raise CheckpointError(f"cannot express the adapters of {directory} as a LoraConfig")
    return PeftAdapter(cfg, with_scaling(_to_jax(unflatten_adapters(flat)), cfg), _to_jax(modules_to_save))


def _written_config(text: str, file: Path) -> LoraConfig:
    """The `LoraConfig` `save_peft` recorded in the safetensors metadata; CheckpointError if it is damaged."""
    try:
        return LoraConfig.from_dict(json.loads(text))
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # not JSON, not a mapping, or not a LoraConfig
        raise CheckpointError(
            f"{file}: its {JLORA_METADATA!r} metadata is damaged ({describe(e)}); is the file corrupt?"
        ) from None


_SCALING_KEYS = (
    "r",
    "lora_alpha",
    "target_modules",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "lora_dropout",
    "use_dora",
)


def _as_written(flat: dict, config: Mapping, original: LoraConfig, modules_to_save: Mapping | None) -> dict | None:
    """The LoRA tree `save_peft` wrote from `original`, if the folder still says exactly that."""
    try:
        split = _as_jlora_slices(flat, original)
        if split is None:
            return None
        lora = unflatten_adapters(split)
        again = peft_config(
            with_scaling(lora, original), original, base_model_name_or_path=None, modules_to_save=modules_to_save
        )
    except ValueError:  # CheckpointError included: the recorded config no longer fits the tensors
        return None
    if any(again[k] != config.get(k) for k in _SCALING_KEYS):
        return None
    return _to_jax(lora)


def _to_jax(tree: Any) -> Any:
    return None if tree is None else jax.tree.map(jax.numpy.asarray, tree)
