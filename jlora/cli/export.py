"""`jlora export RUN_DIR --peft OUT_DIR | --merged OUT_DIR [--step N] [--member K]`: a run's adapter for other tools.

Either folder carries the run's tokenizer: the base's own files, or the tokenizer the run trained
with instead (a byte-tokenizer run's as the equivalent ``GPT2TokenizerFast``, see
`jlora.training.data.tokenizer.ByteTokenizer.hf`). A PEFT adapter needs its base model; a run on a
random base has no checkpoint to name, so the export writes that base too::

    OUT_DIR/adapter_config.json, adapter_model.safetensors, tokenizer.json, ...
    OUT_DIR/base/config.json, model.safetensors, tokenizer.json, ...   (random base only)

and names ``OUT_DIR/base`` (absolute) as ``base_model_name_or_path``. A PiSSA / OLoRA adapter
goes to PEFT as the rank-2r LoRA that equals it on the unmodified base (as PEFT itself converts
such adapters for sharing); the merged model is the residual base plus the adapter.

A population run holds several adapters; ``--member K`` exports member K, at its own rank
(``--member best``: a finished search's winner). An AdaLoRA run goes out in PEFT's AdaLoRA format
(``peft_type: ADALORA``), or with ``--as-lora`` as the plain LoRA equal to it, each module at the rank
its pruning left (``rank_pattern``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jlora.core.lora.adalora import AdaLoraConfig
from jlora.exchange.folders import check_new_folder, new_folder
from jlora.exchange.hf_checkpoint import resolve
from jlora.exchange.merged import save_merged, write_merged
from jlora.exchange.peft import write_peft
from jlora.training.data.tokenizer import load_tokenizer
from jlora.training.records.artifacts import Artifact, TrainedAdapter, open_artifact
from jlora.training.records.checkpoint import find_checkpoint, resolve_member

BYTES_NOTE = (
    "tokenizer: jlora's byte tokenizer, saved as a GPT2TokenizerFast that encodes and decodes the same "
    "(byte b is id b, end-of-text 256, no merges)"
)


def export_command(args: Any) -> int:
    """``jlora export RUN_DIR --peft OUT_DIR | --merged OUT_DIR [--step N] [--member K]``."""
    run_dir = Path(args.run_dir)
    check_new_folder(args.peft or args.merged)  # before anything is loaded
    member = resolve_member(run_dir, args.member)  # "best": the winner the newest checkpoint names
    artifact = open_artifact(find_checkpoint(run_dir, args.step), member=member)  # the checkpoint, read once
    (adapter,) = artifact.adapters
    name, source = artifact.base, artifact.tokenizer  # the run's tokenizer: "bytes", the base's (its name) or another
    about = f"{run_dir} (step {artifact.step}, base {name})"
    if args.peft:
        export_peft(Path(args.peft), artifact, adapter, load_tokenizer(source), as_lora=args.as_lora)
        print(f"PEFT adapter of {about} -> {args.peft}")
        if name == "random":
            base = Path(args.peft) / "base"
            print(
                f"base: the run's random model, written to {base}; load it with transformers' from_pretrained "
                f"and PeftModel.from_pretrained(base_model, '{args.peft}')"
            )
    else:
        model, params, lora = adapter.on(*artifact.load_base())  # trained leaves in (a PiSSA run: its residual)
        base_dir = (
            None if name == "random" else resolve(name) if not name.endswith(".gguf") and name != "smollm2" else None
        )
        # the base's own tokenizer files are copied as they are; any other tokenizer is saved
        tokenizer = None if source == name and base_dir is not None else load_tokenizer(source)
        save_merged(args.merged, model.config, params, lora, base_dir=base_dir, tokenizer=tokenizer)
        print(f"merged model of {about} -> {args.merged}")
    if source == "bytes":
        print(BYTES_NOTE)
    return 0


def export_peft(
    out: Path, artifact: Artifact, adapter: TrainedAdapter, tokenizer: Any, *, as_lora: bool = False
) -> None:
    """The adapter and its tokenizer as a PEFT folder; a random base goes with it, in ``out/base`` (a PiSSA /
    OLoRA adapter as the plain LoRA equal to it on the unmodified base; an AdaLoRA one in PEFT's AdaLoRA
    format, or with `as_lora` as a plain LoRA)."""
    name = artifact.base
    if name == "random":
        recorded = str(out.resolve() / "base")
    else:
        recorded = str(Path(name).resolve()) if Path(name).exists() else name
    with new_folder(out) as tmp:  # the adapter and its base appear together or not at all
        write_peft(
            tmp,
            adapter.lora,
            adapter.config,
            base_model_name_or_path=recorded,
            modules_to_save=adapter.leaves or None,
            tokenizer=tokenizer,
            init=adapter.init,
            adalora=adalora_of(adapter.meta),
            as_lora=as_lora,
        )
        if name == "random":
            model, params = artifact.load_base()
            write_merged(tmp / "base", model.config, params, tokenizer=tokenizer)


def adalora_of(meta: dict | None) -> AdaLoraConfig | None:
    """The ``adalora:`` settings a run's checkpoint records (None: not an AdaLoRA run)."""
    recorded = (meta or {}).get("adalora")
    return None if recorded is None else AdaLoraConfig(**recorded)
