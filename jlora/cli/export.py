"""`jlora export RUN_DIR --peft OUT_DIR | --merged OUT_DIR [--step N]`: a run's adapter for other tools."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from jlora.exchange.hf_checkpoint import resolve
from jlora.exchange.merged import save_merged
from jlora.exchange.peft import save_peft
from jlora.training.checkpoint import find_checkpoint, load_adapter, load_checkpoint, load_init, lora_config_of
from jlora.training.tokenizer import load_tokenizer


def export_command(args: Any) -> int:
    """``jlora export RUN_DIR --peft OUT_DIR | --merged OUT_DIR [--step N]``."""
    run_dir = Path(args.run_dir)
    checkpoint = find_checkpoint(run_dir, args.step)
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
            args.peft,
            lora,
            lora_config_of(meta),
            base_model_name_or_path=base,
            modules_to_save=base_leaves or None,
            init=load_init(checkpoint),  # PiSSA / OLoRA: written as a rank-2r LoRA on the unmodified base
        )
        print(f"PEFT adapter of {run_dir} (step {meta['step']}, base {name}) -> {out}")
        return 0
    model, params, lora, lora_cfg, meta = load_checkpoint(checkpoint)
    name, tokenizer_source = meta["base_model"]["name"], meta.get("tokenizer")
    base_dir = None if name == "random" else resolve(name)
    tokenizer = None  # the base's own files travel with base_dir; another HF tokenizer is saved
    if tokenizer_source not in (None, "bytes", name):
        tokenizer = load_tokenizer(tokenizer_source)
    out = save_merged(args.merged, model.config, params, lora, lora_cfg, base_dir=base_dir, tokenizer=tokenizer)
    print(f"merged model of {run_dir} (step {meta['step']}, base {name}) -> {out}")
    return 0
