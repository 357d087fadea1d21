"""The merged export: a plain Hugging Face GPT-2 checkpoint with the adapter folded in.

::

    params ──with_base_leaves(trained leaves)──merge(lora)──> save_gpt2 ──> OUT_DIR/config.json
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
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jlora.gpt2 import GPT2Config
from jlora.hf_checkpoint import TOKENIZER_FILES, CheckpointError, new_folder, save_gpt2
from jlora.lora_config import LoraConfig
from jlora.merge import merge
from jlora.peft import with_base_leaves

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
        params = with_base_leaves(params, base_leaves)
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


def export_command(args: Any) -> int:
    """``jlora export RUN_DIR --peft OUT_DIR | --merged OUT_DIR [--step N]``."""
    from jlora.checkpoint import latest_checkpoint, load_adapter, load_run, lora_config_of
    from jlora.hf_checkpoint import resolve
    from jlora.peft import save_peft
    from jlora.tokenizer import load_tokenizer

    run_dir = Path(args.run_dir)
    checkpoint = latest_checkpoint(run_dir) if args.step is None else run_dir / "checkpoints" / str(args.step)
    if checkpoint is None or not (checkpoint / "adapter").exists():
        raise CheckpointError(
            f"no adapter checkpoint{'' if args.step is None else f' at step {args.step}'} in {run_dir}"
        )
    if args.peft:
        lora, base_leaves, meta = load_adapter(checkpoint)
        name = meta["base_model"]["name"]
        if name == "random":
            print(
                "jlora export: note: the run's base is a random initialisation, not a Hugging Face checkpoint; "
                "the adapter records no base model (use --merged for a self-contained export)",
                file=sys.stderr,
            )
        base = None if name == "random" else str(Path(name).resolve()) if Path(name).is_dir() else name
        out = save_peft(
            args.peft, lora, lora_config_of(meta), base_model_name_or_path=base, modules_to_save=base_leaves or None
        )
        print(f"PEFT adapter of {run_dir} (step {meta['step']}, base {name}) -> {out}")
        return 0
    model, params, lora, lora_cfg, meta = load_run(run_dir, args.step)
    name, tokenizer_source = meta["base_model"]["name"], meta.get("tokenizer")
    base_dir = None if name == "random" else resolve(name)
    tokenizer = None  # the base's own files travel with base_dir; another HF tokenizer is saved
    if tokenizer_source not in (None, "bytes", name):
        tokenizer = load_tokenizer(tokenizer_source)
    out = save_merged(args.merged, model.config, params, lora, lora_cfg, base_dir=base_dir, tokenizer=tokenizer)
    print(f"merged model of {run_dir} (step {meta['step']}, base {name}) -> {out}")
    return 0
