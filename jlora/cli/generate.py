"""`jlora generate SOURCE --prompt TEXT | --prompts FILE`: continuations of a run, a PEFT folder or a checkpoint.

A run directory is asked as it was trained (`jlora.training.data.prompt`): end-of-text, then the
prompt through its data's template (``Question: ...\nAnswer:`` for QA runs); ``--raw`` sends
the text as written, which is what every other source gets. Without ``--max-new-tokens``, up
to 64 new tokens, fewer (said on stderr) when the model's positions leave less room.

Several adapters answer side by side: ``RUN_DIR --member all`` (or ``--member 0,3``) for a
population's members, ``--adapter DIR --adapter DIR2 ...`` for adapter folders (and runs or
checkpoints) on one base (``--member`` then picks in the population runs among them). They
decode as one mixed batch (`jlora.core.algebra.mixed`: every prompt once per adapter, each row
with its own adapter); adapters that train base leaves (a run's ln_f) cannot share one base, so
they decode one after another. Each prompt is printed, then each adapter's answer on one line
(line breaks escaped, `one_line`). Every decoding option is checked before any model is loaded
(`check_decoding_options`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from jlora.cli.adapters import open_sources, prompt_form, tokenizer_of
from jlora.core.algebra.mixed import stack_adapters
from jlora.core.decoding.generate import check_decoding, generate
from jlora.errors import TokenizerError, UsageError
from jlora.training.data.tokenizer import load_tokenizer
from jlora.training.records.artifacts import open_artifact

DEFAULT_NEW_TOKENS = 64
# What str.splitlines() breaks at, written as its escape: a side-by-side answer stays on its line.
LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}


class Source(NamedTuple):
    """What `load_source` found: the model and adapter, the tokenizer, and how a prompt is encoded.

    ``prompt(text) -> (text as the model reads it, token ids)``.
    """

    model: Any
    params: dict
    lora: dict | None
    tokenizer: Any
    prompt: Callable[[str], tuple[str, list[int]]]


def load_source(
    source: str,
    *,
    base: str | None = None,
    tokenizer: str | None = None,
    raw: bool = False,
    member: int | str | None = None,
) -> Source:
    """A run directory, a checkpoint, a PEFT folder or a model (`open_artifact`), ready to generate from.

    A PEFT folder's base is `base`, else its own ``base/`` folder (what `jlora export --peft`
    writes for a random base), else the ``base_model_name_or_path`` it records; its tokenizer is
    the folder's own if it has one, else the base's. `tokenizer` overrides the source's (a
    checkpoint directory, a Hub id or "bytes"). A run's prompts take its training form unless `raw`;
    `member` picks one adapter of a population run ("best": a finished search's winner).
    """
    artifact = open_artifact(source, member=member, base=base)
    model, params = artifact.load_base()
    lora = None
    if artifact.adapters:
        model, params, lora = artifact.adapters[0].on(model, params)
    tok = load_tokenizer(tokenizer or artifact.tokenizer)
    return Source(model, params, lora, tok, prompt_form(artifact, tok, raw))


def generate_command(args: Any) -> int:
    """``jlora generate SOURCE --prompt TEXT | --prompts FILE [options]``: continuations on stdout, speed on stderr."""
    check_decoding_options(args)
    prompts = list(args.prompt or []) + (read_prompts(args.prompts) if args.prompts else [])
    if not prompts:
        raise UsageError("give --prompt TEXT or --prompts FILE (one prompt per line)")
    if args.adapter or args.member == "all" or isinstance(args.member, tuple):
        return side_by_side_command(args, prompts)
    if args.source is None:
        raise UsageError("give SOURCE (a run, a PEFT folder or a checkpoint), or --adapter DIR (repeatable)")
    try:
        model, params, lora, tokenizer, prompt = load_source(
            args.source, base=args.base, tokenizer=args.tokenizer, raw=args.raw, member=args.member
        )
        texts, encoded = zip(*map(prompt, prompts), strict=True)
    except TokenizerError as e:
        raise UsageError(f"{e} (pass --tokenizer)") from e
    options = decoding_options(args, encoded, model, tokenizer)
    try:
        out = generate(model, params, encoded, lora=lora, **options)
    except ValueError as e:  # lengths and sampling options
        raise UsageError(str(e)) from e
    for text, row in zip(texts, out.sequences(), strict=True):
        print(text + tokenizer.decode(row))
    print(
        f"{int(out.lengths.sum())} tokens in {out.seconds:.2f} s: {out.tokens_per_s:.1f} tokens/s "
        f"(batch {len(prompts)}; compiling took {out.compile_seconds:.1f} s)",
        file=sys.stderr,
    )
    return 0


def read_prompts(name: str) -> list[str]:
    """The prompts of a --prompts file, one a line (blank lines skipped); UsageError naming the file when it is
    missing, a folder, not UTF-8 text, or holds no prompt."""
    file = Path(name)
    if not file.exists():
        raise UsageError(f"--prompts: no such file {file}")
    if file.is_dir():
        raise UsageError(f"--prompts {file} is a folder; give a text file of prompts, one a line")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = file.read_bytes()[: e.start].count(b"\n") + 1
        raise UsageError(f"--prompts {file}, line {line}: not UTF-8 text (byte {e.object[e.start]:#04x})") from None
    except OSError as e:
        raise UsageError(f"--prompts: cannot read {file} ({e.strerror})") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"--prompts {file} holds no prompt (it is empty or blank); write one prompt a line")
    return prompts


def one_line(text: str) -> str:
    """`text` with its line breaks escaped (``\\n`` for a new line), for one line of a side-by-side table.

    >>> one_line("6\\nQuestion:")
    '6\\\\nQuestion:'
    """
    return text.translate(LINE_BREAKS)


def decoding_options(args: Any, encoded: Sequence[Sequence[int]], model, tokenizer) -> dict:
    """`generate`'s keyword arguments from the command line, once the encoded prompts are known to fit the model."""
    if any(not ids for ids in encoded):
        raise UsageError("a prompt encodes to no tokens")
    if max(max(ids) for ids in encoded) >= model.config.vocab_size:
        raise UsageError(
            f"the tokenizer's ids exceed the model's vocabulary ({model.config.vocab_size}); pass --tokenizer"
        )
    check_decoding_options(args, vocab=model.config.vocab_size)
    return dict(
        max_new_tokens=new_tokens(args.max_new_tokens, max(map(len, encoded)), model.config.n_positions),
        eos_token_id=tokenizer.eos_token_id,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        repetition_penalty=args.repetition_penalty,
    )


# The decoding options `generate` and `evaluate` take, by their argparse names.
DECODING = (
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "num_beams",
    "length_penalty",
    "no_repeat_ngram_size",
    "repetition_penalty",
)


def flag(name: str) -> str:
    """An option's name as its flag: ``flag("top_p") == "--top-p"``."""
    return "--" + name.replace("_", "-")


def check_decoding_options(args: Any, vocab: int | None = None) -> None:
    """The decoding options of the command line, as `check_decoding` checks them for every caller: before any
    model is loaded, then with the model's `vocab` (UsageError naming the flag and the value)."""
    given = {name: getattr(args, name) for name in DECODING if getattr(args, name, None) is not None}
    check_decoding(**given, vocab=vocab, name=flag, error=UsageError)


def new_tokens(asked: int | None, longest: int, n_positions: int) -> int:
    """`asked`, or (None) up to DEFAULT_NEW_TOKENS, as many as the model's positions leave room for."""
    if asked is not None:
        return asked  # generate() refuses what does not fit, saying how much does
    room = n_positions - longest
    if room < 1:
        raise UsageError(
            f"the longest prompt has {longest} tokens, leaving none of the model's {n_positions} positions"
        )
    if room < DEFAULT_NEW_TOKENS:
        print(
            f"jlora generate: note: {room} new tokens at most: the longest prompt takes {longest} of the model's "
            f"{n_positions} positions (--max-new-tokens sets the number)",
            file=sys.stderr,
        )
    return min(room, DEFAULT_NEW_TOKENS)


def side_by_side_command(args: Any, prompts: list[str]) -> int:
    """Every adapter's answer to each prompt: a run's members (``--member all``) or ``--adapter`` folders."""
    if args.source is not None and args.adapter:
        raise UsageError("give SOURCE with --member, or --adapter DIR ... with --base; not both")
    if args.source is not None:
        artifacts = open_sources([args.source], args.member, args.base)
    else:
        artifacts = open_sources(args.adapter, args.member, args.base)  # --member picks in population runs
    found = [a.plain() for artifact in artifacts for a in artifact.adapters]  # each on the base as it is
    try:
        tokenizer = tokenizer_of(artifacts[0], args.tokenizer)
        if tokenizer is None:
            raise UsageError(f"no tokenizer for {found[0].label} or its base; pass --tokenizer")
        texts, encoded = zip(*map(prompt_form(artifacts[0], tokenizer, args.raw), prompts), strict=True)
    except TokenizerError as e:
        raise UsageError(f"{e} (pass --tokenizer)") from e
    model, params = artifacts[0].load_base()
    options = decoding_options(args, encoded, model, tokenizer)
    try:
        if any(f.leaves for f in found):  # each its own base leaves: one adapter at a time
            on_base = (f.on(model, params) for f in found)  # its LoraConfig, its trained leaves, its adapters
            outs = [generate(m, p, encoded, lora=lora, **options) for m, p, lora in on_base]
            answers = [out.sequences() for out in outs]
            how = f"{len(found)} adapters one after another (they train base leaves, which one batch cannot share)"
        else:
            stack = stack_adapters([f.lora for f in found])
            rows = [ids for _ in found for ids in encoded]
            index = [k for k in range(len(found)) for _ in encoded]
            outs = [generate(model, params, rows, adapters=stack, adapter_index=index, **options)]
            sequences = outs[0].sequences()
            answers = [sequences[k * len(encoded) : (k + 1) * len(encoded)] for k in range(len(found))]
            how = f"{len(found)} adapters x {len(encoded)} prompts as one mixed batch"
    except ValueError as e:  # lengths and sampling options
        raise UsageError(str(e)) from e
    prefix = f"{artifacts[0].source} "
    labels = [f.label.removeprefix(prefix) if len(artifacts) == 1 else f.label for f in found]
    width = max(map(len, labels))
    for p, text in enumerate(texts):
        print(text)
        for label, rows in zip(labels, answers, strict=True):
            print(f"  {label:<{width}} | {one_line(tokenizer.decode(rows[p]))}")
    tokens = sum(int(out.lengths.sum()) for out in outs)
    seconds = sum(out.seconds for out in outs)
    print(
        f"{tokens} tokens in {seconds:.2f} s: {tokens / max(seconds, 1e-9):.1f} tokens/s ({how}; "
        f"compiling took {sum(out.compile_seconds for out in outs):.1f} s)",
        file=sys.stderr,
    )
    return 0
