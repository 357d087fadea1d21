"""`jlora evaluate RUN_DIR --data FILE`: a data-to-text test file decoded with the run's adapter and scored.

The LoRA paper's E2E evaluation (microsoft/LoRA ``gpt2_beam.py``, ``gpt2_decode.py``, ``measure_scores.py``)
as one command::

    read_references(FILE)                 each MR once, with its references   (jlora.training.data.sources)
      -> the run's prompt form            e MR e, as its rows were             (jlora.training.data.prompt)
      -> beam search, cut at end-of-text  10 beams, length penalty 0.8, no repeated 4-gram, 64 tokens
      -> clean_text -> nlg_metrics.score  BLEU, NIST, METEOR, ROUGE-L, CIDEr   (jlora.research)

Written under --out (default RUN_DIR/evaluate): ``outputs.jsonl`` (a record per MR: context, output,
references), ``summary.json`` (the scores and the settings), and ``e2e_ref.txt`` / ``e2e_pred.txt``
for the challenge's own ``measure_scores.py``. The nlg extra and Java (for METEOR, ROUGE-L and CIDEr)
are checked before anything is decoded.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from jlora.checks import check_number
from jlora.cli.adapters import run_data
from jlora.cli.generate import check_decoding_options, load_source
from jlora.errors import UsageError
from jlora.exchange.folders import check_out_dir

COCO = ("meteor", "rouge_l", "cider")  # nlg_metrics.COCO_METRICS, named here before the extra is imported
NLG_EXTRA = "the nlg extra (sacrebleu, pycocoevalcap) is not installed: pip install 'jlora[nlg]'"


def metrics_of(text: str) -> tuple[str, ...]:
    """--metrics bleu,nist,... as a tuple, each name checked."""
    from jlora.research.nlg_metrics import METRICS

    names = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in names if m not in METRICS]
    if not names or unknown:
        raise UsageError(f"--metrics: expected some of {','.join(METRICS)}, got {text!r}")
    return names


def check_options(args: Any) -> None:
    """Every option, the nlg extra and Java: a one-line UsageError before any model is loaded."""
    check_decoding_options(args)
    check_number("--batch-size", args.batch_size, ">= 1", integer=True, error=UsageError)
    if args.limit is not None:
        check_number("--limit", args.limit, ">= 1", integer=True, error=UsageError)
    run = Path(args.run_dir)
    if not (run / "config.yaml").is_file() or not (run / "checkpoints").is_dir():
        raise UsageError(f"{run} is not a run directory (no config.yaml and checkpoints/)")
    if not Path(args.data).expanduser().is_file():
        raise UsageError(f"--data: no such file {args.data}")
    check_out_dir(Path(args.out) if args.out else run / "evaluate")  # now, not after decoding
    try:
        import jlora.research.nlg_metrics  # noqa: F401
    except ImportError:
        raise UsageError(f"jlora evaluate scores with {NLG_EXTRA}") from None
    if any(m in COCO for m in metrics_of(args.metrics)) and shutil.which("java") is None:
        raise UsageError(
            "METEOR, ROUGE-L and CIDEr need Java on PATH (coco-caption's jars; OpenJDK 17 runs them): "
            "install a JRE, or pass --metrics bleu,nist"
        )


def evaluate_command(args: Any) -> int:
    """The `jlora evaluate` handler: outputs and scores under --out, the scores on stdout."""
    from tqdm.auto import tqdm

    from jlora.research import nlg_metrics
    from jlora.research.nlg_eval import decode_outputs, write_measure_scores_files
    from jlora.training.data.prompt import DATA2TEXT, data_format
    from jlora.training.data.sources import read_references

    check_options(args)
    metrics = metrics_of(args.metrics)
    run = Path(args.run_dir)
    fmt = data_format(run_data(run / "config.yaml"))
    if fmt is not None and fmt not in DATA2TEXT:
        raise UsageError(f"{run} was trained on {fmt!r} records; jlora evaluate decodes data-to-text runs")
    contexts, references = read_references(args.data)
    total = len(contexts)
    if args.limit is not None and args.limit < total:
        contexts, references = contexts[: args.limit], references[: args.limit]
        if "cider" in metrics:
            print(
                f"jlora evaluate: note: CIDEr over {len(contexts)} of {total} MRs is not the full set's CIDEr (its "
                "document frequencies come from the references scored); the other scores are averages or sums",
                file=sys.stderr,
            )
    model, params, lora, tokenizer, prompt = load_source(str(run), member=args.member)
    prompts = [prompt(context)[1] for context in contexts]
    options = dict(
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
    )
    longest, n_positions = max(map(len, prompts)), model.config.n_positions
    if longest + args.max_new_tokens > n_positions:
        raise UsageError(
            f"the longest prompt ({longest} tokens) + --max-new-tokens {args.max_new_tokens} exceeds the model's "
            f"{n_positions} positions (at most {max(n_positions - longest, 0)} new tokens fit)"
        )
    check_decoding_options(args, vocab=model.config.vocab_size)
    batches = -(-len(prompts) // min(args.batch_size, len(prompts)))
    start = time.perf_counter()
    with tqdm(total=batches, desc="decoding", unit="batch", dynamic_ncols=True, file=sys.stderr) as bar:
        outputs = decode_outputs(
            model, params, tokenizer, prompts, lora=lora, batch_size=args.batch_size, progress=bar.update, **options
        )
    seconds = time.perf_counter() - start
    scores = nlg_metrics.score(outputs, references, metrics)

    out = Path(args.out) if args.out else run / "evaluate"
    out.mkdir(parents=True, exist_ok=True)
    with (out / "outputs.jsonl").open("w", encoding="utf-8") as f:
        for context, output, refs in zip(contexts, outputs, references, strict=True):
            f.write(json.dumps({"context": context, "output": output, "references": refs}, ensure_ascii=False) + "\n")
    write_measure_scores_files(outputs, references, out)
    summary = {
        "scores": scores,
        "run": str(run),
        "member": args.member,
        "data": str(args.data),
        "mrs": len(contexts),
        "mrs_in_file": total,
        "decoding": {**options, "batch_size": args.batch_size},
        "decode_seconds": seconds,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    names = {"bleu": "BLEU", "nist": "NIST", "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider": "CIDEr"}
    print("  ".join(f"{names[m]} {v:.{3 if m in ('nist', 'cider') else 2}f}" for m, v in scores.items()))
    print(f"{len(contexts)} MRs decoded in {seconds:.1f} s; outputs and scores in {out}", file=sys.stderr)
    return 0
