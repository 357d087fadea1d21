"""The merged export: a plain Hugging Face GPT-2 checkpoint with the adapter folded in.

::

    params ──overlay(trained leaves)──merge(lora)──> save_gpt2 ──> OUT_DIR/config.json
    base checkpoint dir ── tokenizer files, generation_config.json ──────>        model.safetensors
                                                                                  vocab.json, merges.txt, ...

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

from jlora.core.gpt2 import GPT2Config
from jlora.core.lora_config import LoraConfig
from jlora.core.merge import merge
from jlora.errors import CheckpointError
from jlora.exchange.hf_checkpoint import TOKENIZER_FILES, new_folder, save_gpt2
from jlora.tree import overlay

# config.json fields that are the checkpoint's, not the architecture's: kept from the base.
KEPT_CONFIG_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "task_specific_params")


def save_merged(
    out_dir: str | os.PathLike,
    config: GPT2Config,
    params: Mapping,
    lora: Mapping | None = None,
    lora_cfg: LoraConfig | None = None,
    *,
    base_leaves: Mapping | None = None,
    base_dir: str | os.PathLike | None = None,
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write the adapted model as a Hugging Face GPT-2 checkpoint.

    Args:
      out_dir: the folder to create (an existing non-empty one needs `overwrite`).
      config: the model's `GPT2Config`.
      params: the base parameter tree; lora, lora_cfg: the adapters and their config (None: none).
      base_leaves: trained base leaves (e.g. ``{"ln_f": {...}}``), put in place before merging.
      base_dir: the base checkpoint directory; its tokenizer files, generation_config.json and
        token ids in config.json travel with the export.
      tokenizer: a tokenizer to save instead of `base_dir`'s (an object with ``save_pretrained``
        or jlora's ``HFTokenizer``); jlora's byte tokenizer has no Hugging Face form and is skipped.

    Raises:
      CheckpointError: the merged weights are not finite, or `out_dir` is in the way.
    """
    with new_folder(out_dir, overwrite=overwrite) as tmp:
        params = overlay(params, base_leaves)
        if lora:
            if lora_cfg is None:
                raise CheckpointError("merging adapters needs their LoraConfig (lora_cfg)")
            try:
                params = merge(params, lora, lora_cfg)
            except ValueError as e:  # an adapter that does not fit, or a non-finite result
                raise CheckpointError(str(e)) from e
        save_gpt2(tmp, config, params)
        if base_dir is not None:
            _copy_from_base(Path(base_dir), tmp)
        hf_tokenizer = getattr(tokenizer, "hf", tokenizer)
        if hasattr(hf_tokenizer, "save_pretrained"):
            hf_tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def _copy_from_base(base_dir: Path, out: Path) -> None:
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (base_dir / name).exists():
            shutil.copy2(base_dir / name, out / name)
    if (base_dir / "config.json").exists():
        base = json.loads((base_dir / "config.json").read_text())
        ours = json.loads((out / "config.json").read_text())
        ours.update({k: base[k] for k in KEPT_CONFIG_FIELDS if k in base})
        (out / "config.json").write_text(json.dumps(ours, indent=2) + "\n")
