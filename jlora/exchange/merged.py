"""The merged export: a plain Hugging Face GPT-2 checkpoint with the adapter folded in.

::

    params ──overlay(trained leaves)──merge(lora)──> save_model ──> OUT_DIR/config.json
    base checkpoint dir ── tokenizer files, generation_config.json ──────>        model.safetensors
    or the run's own tokenizer (e.g. bytes) ─────────────────────────────>        tokenizer.json, ...

The token ids in config.json (bos, eos, pad) are the tokenizer's: the base's, or the end-of-text
id of the tokenizer given, so they always lie inside the vocabulary.

transformers' ``GPT2LMHeadModel.from_pretrained(OUT_DIR)`` then computes the LoRA model's
logits with no PEFT and no jlora. Like `save_peft`, it writes into a hidden sibling folder
and renames it at the end, so an error never leaves a partial checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jlora.core.lora.merge import merge
from jlora.errors import CheckpointError
from jlora.exchange.folders import new_folder
from jlora.exchange.hf_checkpoint import TOKENIZER_FILES, save_model, save_tokenizer
from jlora.tree import overlay

# config.json fields that are the checkpoint's, not the architecture's: kept from the base.
KEPT_CONFIG_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "task_specific_params")


def save_merged(
    out_dir: str | os.PathLike,
    config: Any,
    params: Mapping,
    lora: Mapping | None = None,
    *,
    base_leaves: Mapping | None = None,
    base_dir: str | os.PathLike | None = None,
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write the adapted model as a Hugging Face checkpoint of its family (GPT-2, Llama, ...).

    Args:
      out_dir: the folder to create (an existing non-empty one needs `overwrite`).
      config: the model's config (`GPT2Config`, `LlamaConfig`).
      params: the base parameter tree; lora: the adapters, each with its scale (None: none).
      base_leaves: trained base leaves (e.g. ``{"ln_f": {...}}``), put in place before merging.
      base_dir: the base checkpoint directory; its generation_config.json, the token ids in its
        config.json and (without `tokenizer`) its tokenizer files travel with the export.
      tokenizer: the model's tokenizer when it is not `base_dir`'s own: a transformers tokenizer,
        or jlora's (`HFTokenizer`, `ByteTokenizer`) through its ``hf`` form. It is saved instead
        of the base's, and its end-of-text id becomes the bos / eos (and pad) id.

    Raises:
      CheckpointError: the merged weights are not finite, or `out_dir` is in the way.
    """
    with new_folder(out_dir, overwrite=overwrite) as tmp:
        write_merged(tmp, config, params, lora, base_leaves=base_leaves, base_dir=base_dir, tokenizer=tokenizer)
    return Path(out_dir)


def write_merged(
    folder: Path,
    config: Any,
    params: Mapping,
    lora: Mapping | None = None,
    *,
    base_leaves: Mapping | None = None,
    base_dir: str | os.PathLike | None = None,
    tokenizer: Any = None,
) -> None:
    """The files of `save_merged`'s checkpoint, written into the existing `folder` (made if missing: a
    ``base/`` beside a PEFT adapter goes inside that adapter's folder, under the same writer)."""
    params = overlay(params, base_leaves)
    if lora:
        try:
            params = merge(params, lora)
        except ValueError as e:  # an adapter that does not fit, or a non-finite result
            raise CheckpointError(str(e)) from e
    save_model(folder, config, params)
    if base_dir is not None:
        _copy_from_base(Path(base_dir), folder, tokenizer_files=tokenizer is None)
    if tokenizer is not None:
        _set_token_ids(folder, save_tokenizer(tokenizer, folder))


def _copy_from_base(base_dir: Path, out: Path, *, tokenizer_files: bool) -> None:
    for name in (*(TOKENIZER_FILES if tokenizer_files else ()), "generation_config.json"):
        if (base_dir / name).exists():
            shutil.copy2(base_dir / name, out / name)
    if (base_dir / "config.json").exists():
        base = json.loads((base_dir / "config.json").read_text())
        _update_json(out / "config.json", {k: base[k] for k in KEPT_CONFIG_FIELDS if k in base})


def _set_token_ids(out: Path, eos_token_id: int) -> None:
    """GPT-2 has one special token: end-of-text is also its bos (and, where one is set, pad) id."""
    for name in ("config.json", "generation_config.json"):
        if (out / name).exists():
            ids = {"bos_token_id": eos_token_id, "eos_token_id": eos_token_id}
            if json.loads((out / name).read_text()).get("pad_token_id") is not None:
                ids["pad_token_id"] = eos_token_id
            _update_json(out / name, ids)


def _update_json(file: Path, fields: Mapping) -> None:
    file.write_text(json.dumps({**json.loads(file.read_text()), **fields}, indent=2) + "\n")
