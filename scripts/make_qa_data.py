"""Write jlora's bundled QA task: ``jlora/data/qa_train.jsonl`` and ``jlora/data/qa_val.jsonl``.

    python scripts/make_qa_data.py            # rewrites the two committed files, byte for byte

Eight rule-following templates, each a short question with a short answer, so that a tiny
GPT-2 trained on byte tokens for a few minutes can learn them from 1,000 examples::

    What is 23 plus 19?               -> 42        What number comes after 409?    -> 410
    What is 41 minus 17?              -> 24        Is 736 even or odd?             -> even
    Reverse the word garden.          -> nedrag    Write garden in capital letters. -> GARDEN
    How many letters are in garden?   -> 6         What is the last letter of garden? -> n

Every template appears in both splits; its items (the question strings) are drawn without
replacement, so no validation question occurs in training. Deterministic: a fixed seed and
sorted word list, no dependence on the Python hash seed.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 4
N_TRAIN = 125  # per template: 8 templates -> 1,000 training pairs
N_VAL = 25  # per template: 200 validation pairs
OUT = Path(__file__).resolve().parent.parent / "jlora" / "data"

WORDS = sorted(
    set(
        """
        able acid aged also area army away baby back ball band bank base bath bear beat bell belt best
        bird blue boat body bone book boot born both bowl burn busy cake call calm camp card care cart
        case cash cell chef city clay coat code coin cold cook cool corn cost crew crop dark data date
        dawn deal deep desk diet dish door down draw drop drum duck dust duty earn east easy edge else
        face fact fair farm fast fear feet file film fire fish flag flat flow food foot fork form fuel
        game gate gift girl glad goal gold golf good grey grow hair half hall hand hard harm head heat
        help hero high hill home hope horn host hour huge idea iron item jazz join joke jump keen keep
        kind king kiss lake lamp land lane last late lead leaf lean left lens life lift like line lion
        list load loan lock long look lord loss loud love luck mail main make mark meal meat menu milk
        mind mint miss mood moon most move name navy near neck nest news nice nose note open oven pack
        page pain pair park path peak pick pink pipe plan play plot poem pole pool port post pull pure
        rain rank rare rate read rice rich ride ring rise risk road rock roof room root rope rose rule
        apple beach bread brick chair chalk cloud crane dance dream eagle earth field flame frost fruit
        glass grape green heart horse house juice knife lemon light river robot salad sheep shirt smile
        snake sound spoon stone storm sugar table tiger toast tooth train water whale wheel world zebra
        animal basket bottle bridge camera candle carpet castle cheese circle coffee cookie dragon
        finger flower forest garden guitar hammer island jacket ladder letter magnet market mirror
        monkey needle orange pencil pepper pillow planet pocket rabbit ribbon rocket saddle silver
        spider spring summer ticket tomato turtle valley violin window winter yellow
        """.split()
    )
)


def _items(rng: random.Random) -> list[list[tuple[str, str]]]:
    """For each template, its (question, answer) pairs in random order, all distinct."""
    pairs = [
        [(f"What is {a} plus {b}?", str(a + b)) for a in range(50) for b in range(50)],
        [(f"What is {a} minus {b}?", str(a - b)) for a in range(60) for b in range(a + 1)],
        [(f"What number comes after {n}?", str(n + 1)) for n in range(1000)],
        [(f"Is {n} even or odd?", "odd" if n % 2 else "even") for n in range(1000)],
        [(f"Reverse the word {w}.", w[::-1]) for w in WORDS],
        [(f"Write {w} in capital letters.", w.upper()) for w in WORDS],
        [(f"How many letters are in {w}?", str(len(w))) for w in WORDS],
        [(f"What is the last letter of {w}?", w[-1]) for w in WORDS],
    ]
    for template in pairs:
        rng.shuffle(template)
    return pairs


def make_splits(seed: int = SEED, n_train: int = N_TRAIN, n_val: int = N_VAL) -> tuple[list[dict], list[dict]]:
    """(train, validation) lists of {"question", "answer"} records, disjoint in questions."""
    rng = random.Random(seed)
    train, val = [], []
    for template in _items(rng):
        if len(template) < n_train + n_val:
            raise ValueError(f"a template has only {len(template)} items, {n_train + n_val} requested")
        val += [{"question": q, "answer": a} for q, a in template[:n_val]]
        train += [{"question": q, "answer": a} for q, a in template[n_val : n_val + n_train]]
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val


def to_jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="output directory (default: the package's data/)")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    train, val = make_splits(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, records in (("qa_train.jsonl", train), ("qa_val.jsonl", val)):
        (args.out / name).write_text(to_jsonl(records), encoding="utf-8")
        print(f"wrote {len(records)} pairs to {args.out / name}")


if __name__ == "__main__":
    main()
