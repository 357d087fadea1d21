"""`jlora generate SOURCE --prompt TEXT | --prompts FILE`: continuations of a run, a PEFT folder or a checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from jlora.core.generate import generate
from jlora.errors import CheckpointError, TokenizerError, UsageError
from jlora.exchange.hf_checkpoint import load_gpt2
from jlora.exchange.peft import ADAPTER_CONFIG, load_peft, read_adapter_config
from jlora.training.checkpoint import load_run
from jlora.training.tokenizer import load_tokenizer
from jlora.tree import overlay


def load_source(
    source: str, *, base: str | None = None, tokenizer: str | None = None, member: int | None = None
) -> tuple:
    """(model, params, lora, tokenizer) from a run directory, a PEFT folder or a Hugging Face checkpoint.

    A PEFT folder needs its base: `base`, or the ``base_model_name_or_path`` it records.
    `tokenizer` overrides the source's own (a checkpoint directory, a Hub id or "bytes").
    `member` picks one adapter of a population run.
    """
    path = Path(source).expanduser()
    if (path / "config.yaml").exists() and (path / "checkpoints").is_dir():
        model, params, lora, _, meta = load_run(path, member=member)
        return model, params, lora, load_tokenizer(tokenizer or meta["tokenizer"])
    if (path / ADAPTER_CONFIG).exists():
        base = base or read_adapter_config(path).get("base_model_name_or_path")
        if not base:
            raise CheckpointError(f"{path / ADAPTER_CONFIG} names no base model; pass --base")
        cfg, lora, leaves = load_peft(path)
        model, params = load_gpt2(base, lora=cfg)
        return model, overlay(params, leaves), lora, load_tokenizer(tokenizer or base)
    model, params = load_gpt2(source)
    return model, params, None, load_tokenizer(tokenizer or source)


def generate_command(args: Any) -> int:
    """``jlora generate SOURCE --prompt TEXT | --prompts FILE [options]``: continuations on stdout, speed on stderr."""
    prompts = list(args.prompt or [])
    if args.prompts:
        file = Path(args.prompts)
        if not file.exists():
            raise UsageError(f"--prompts: no such file {file}")
        prompts += [line for line in file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UsageError("give --prompt TEXT or --prompts FILE (one prompt per line)")
    try:
        model, params, lora, tokenizer = load_source(
            args.source, base=args.base, tokenizer=args.tokenizer, member=args.member
        )
        encoded = [tokenizer.encode(p) for p in prompts]
    except TokenizerError as e:
        raise UsageError(f"{e} (pass --tokenizer)") from e
    if any(not ids for ids in encoded):
        raise UsageError("a prompt encodes to no tokens")
    if max(max(ids) for ids in encoded) >= model.config.vocab_size:
        raise UsageError(
            f"the tokenizer's ids exceed the model's vocabulary ({model.config.vocab_size}); pass --tokenizer"
        )
    try:
        out = generate(
            model,
            params,
            encoded,
            lora=lora,
            max_new_tokens=args.max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        )
    except ValueError as e:  # lengths and sampling options
        raise UsageError(str(e)) from e
    for prompt, row in zip(prompts, out.sequences(), strict=True):
        print(prompt + tokenizer.decode(row))
    print(
        f"{int(out.lengths.sum())} tokens in {out.seconds:.2f} s: {out.tokens_per_s:.1f} tokens/s "
        f"(batch {len(prompts)}; compiling took {out.compile_seconds:.1f} s)",
        file=sys.stderr,
    )
    return 0
