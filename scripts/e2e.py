"""The LoRA paper's E2E experiment (Table 3) end to end: train configs/e2e_gpt2m.yaml, then decode and score.

    python scripts/e2e.py --data data/e2e --out runs/e2e_gpt2m   # a GPU: GPT-2 medium, 26,290 steps, 630 test MRs
    python scripts/e2e.py --quick --out runs/e2e_quick            # offline on a CPU, under a minute (the tests run it)

Two commands, composed (docs/e2e.md gives them to run by hand)::

    jlora train e2e_gpt2m --set data.train=DATA/train.txt --set data.validation=DATA/valid.txt [--set ...] --out OUT
    jlora evaluate OUT --data DATA/test.txt        # 10 beams, length penalty 0.8, no repeated 4-gram, 64 new tokens

``--quick`` writes a tiny E2E-shaped data set under OUT/data (MR||text lines: 64 training rows,
8 validation rows, 6 test MRs with 3 references each), trains the recipe's adapter (r=4, alpha=32
on q and v, label smoothing 0.1) on a tiny random GPT-2 over byte tokens for 40 steps, and decodes
the test MRs with 4 beams: every part of the run, none of its scale. The scores of so small a
model mean nothing; that the pipeline runs offline and writes them is what it shows. The summary
(the evaluation's summary.json, with the training's last loss) goes to OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jlora.checks import check_number  # noqa: E402
from jlora.cli import exit_status  # noqa: E402
from jlora.cli import main as jlora  # noqa: E402
from jlora.errors import UsageError  # noqa: E402

# The quick run's changes to e2e_gpt2m: a tiny random GPT-2 (128 positions: the rows are under 110 bytes, the
# prompts under 80) over byte tokens, a few steps at a large learning rate.
QUICK_SETS = [
    "model=random",
    "model.random={n_layer: 2, n_embd: 64, n_head: 2, n_positions: 128}",
    "data.tokenizer=bytes",
    "data.buckets=64",
    "seq_len=128",
    "steps=40",
    "optim.warmup_steps=4",
    "optim.lr=1.0e-2",
    "eval_every=40",
    "eval_batches=2",
    "checkpoint.every=40",
    "log_every=10",
]
QUICK_EVALUATE = ["--num-beams", "4", "--max-new-tokens", "48", "--batch-size", "6"]

# Restaurants and their attributes (E2E's own kind of MR, shortened): the tiny set is every name x food x area.
NAMES = ("Aromi", "Zizzi", "Cotto", "The Eagle", "Giraffe", "Alimentum", "Loch Fyne", "Wildwood")
FOODS = ("Chinese", "English", "Italian", "French")
AREAS = ("riverside", "city centre")


def mr(name: str, food: str, area: str) -> str:
    return f"name : {name} | food : {food} | area : {area}"


def texts(name: str, food: str, area: str) -> list[str]:
    """Three ways to say an MR (E2E's test MRs have several references)."""
    return [
        f"{name} serves {food} food in the {area} .",
        f"In the {area} , {name} has {food} food .",
        f"{name} is a restaurant near the {area} serving {food} food .",
    ]


def write_tiny_e2e(folder: Path) -> Path:
    """train.txt, valid.txt and test.txt of E2E-shaped MR||text lines in `folder` (made if missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    combos = [(n, f, a) for n in NAMES for f in FOODS for a in AREAS]  # 64 MRs
    test = combos[5::11]  # 6 MRs the training rows never show
    seen = [c for c in combos if c not in test]
    lines = {
        "train.txt": [f"{mr(*c)}||{texts(*c)[i % 2]}" for i, c in enumerate(seen[:32] * 2)],
        "valid.txt": [f"{mr(*c)}||{texts(*c)[2]}" for c in seen[32:40]],
        "test.txt": [f"{mr(*c)}||{text}" for c in test for text in texts(*c)],
    }
    for name, rows in lines.items():
        (folder / name).write_text("".join(row + "\n" for row in rows), encoding="utf-8")
    return folder


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="the folder with E2E's train.txt, valid.txt and test.txt (not with --quick)")
    parser.add_argument("--out", required=True, help="the run directory; its evaluation goes to OUT/evaluate")
    parser.add_argument("--quick", action="store_true", help="a tiny set and model, offline on a CPU (a check)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    parser.add_argument("--limit", type=int, help="evaluate only the first N test MRs (CIDEr is then the subset's)")
    parser.add_argument("--metrics", help="jlora evaluate --metrics (default: all five; meteor, rouge_l, cider: Java)")
    args = parser.parse_args(argv)
    if args.quick == bool(args.data):
        parser.error("give --data DIR (the E2E files) or --quick (a tiny set written under --out)")
    if args.limit is not None:  # before training: jlora evaluate would refuse it only after
        check_number("--limit", args.limit, ">= 1", integer=True, error=UsageError)
    out = Path(args.out)
    data = write_tiny_e2e(out / "data") if args.quick else Path(args.data)
    sets = (QUICK_SETS if args.quick else []) + [
        f"data.train={data / 'train.txt'}",
        f"data.validation={data / 'valid.txt'}",
    ]
    sets += args.set
    if jlora(["train", "e2e_gpt2m", *(a for s in sets for a in ("--set", s)), "--out", str(out)]) != 0:
        raise SystemExit("scripts/e2e.py: training failed")
    evaluate = ["evaluate", str(out), "--data", str(data / "test.txt"), *(QUICK_EVALUATE if args.quick else [])]
    evaluate += [
        *(["--limit", str(args.limit)] if args.limit is not None else []),
        *(["--metrics", args.metrics] if args.metrics else []),
    ]
    if jlora(evaluate) != 0:
        raise SystemExit("scripts/e2e.py: evaluation failed")
    summary = json.loads((out / "evaluate" / "summary.json").read_text())
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    summary["train_loss"] = last[-1]["loss"] if last else None
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    sys.exit(exit_status("e2e.py", main))
