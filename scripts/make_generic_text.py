"""Write jlora's bundled generic text: ``jlora/data/generic_text.jsonl``, the held-out set for forgetting.

    python scripts/make_generic_text.py       # rewrites the committed file, byte for byte

Plain everyday sentences, nothing like the QA task's questions (arithmetic and spelling), so a
model fine-tuned on the task can be asked how much it forgot of text in general::

    The patient child borrowed a small boat in the evening.
    Fog drifted on the station in the morning.
    My grandmother keeps a patient fox behind the house.

Short enough (at most 60 characters) to fit the embedded default's 64 byte tokens whole. Twelve
sentence patterns filled from small word lists; deterministic (a fixed seed, no dependence on the
Python hash seed).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 11
N = 300
MAX_CHARS = 60
OUT = Path(__file__).resolve().parent.parent / "jlora" / "data" / "generic_text.jsonl"

PEOPLE = "baker farmer teacher doctor sailor painter student driver child neighbour writer gardener".split()
KIN = "sister brother mother father uncle aunt cousin friend grandmother".split()
ADJ = "old young tired cheerful quiet busy careful patient clever kind".split()
PLACES = "harbour village market station library garden kitchen valley forest river bridge square".split()
TIMES = "before sunrise|in the morning|after lunch|all afternoon|in the evening|late at night|on Sunday".split("|")
WEATHER = "Rain fell|Snow settled|A cold wind blew|The sun shone|Fog drifted|A storm passed".split("|")
THINGS = "a letter|the bread|a map|some apples|the old piano|a warm coat|the garden gate|a small boat".split("|")
VERBS = "opened|painted|carried|mended|found|sold|cleaned|borrowed".split("|")
ANIMALS = "dog|cat|horse|goat|owl|fox|duck".split("|")

PATTERNS = [
    lambda r: f"The {r.choice(ADJ)} {r.choice(PEOPLE)} {r.choice(VERBS)} {r.choice(THINGS)} {r.choice(TIMES)}.",
    lambda r: f"{r.choice(WEATHER)} on the {r.choice(PLACES)} {r.choice(TIMES)}.",
    lambda r: f"My {r.choice(KIN)} keeps a {r.choice(ADJ)} {r.choice(ANIMALS)} behind the house.",
    lambda r: f"My {r.choice(KIN)} {r.choice(VERBS)} {r.choice(THINGS)} {r.choice(TIMES)}.",
    lambda r: f"We walked to the {r.choice(PLACES)} and back {r.choice(TIMES)}.",
    lambda r: f"The {r.choice(ANIMALS)} slept by the door {r.choice(TIMES)}.",
    lambda r: f"A {r.choice(ADJ)} {r.choice(ANIMALS)} waited near the {r.choice(PLACES)}.",
    lambda r: f"The {r.choice(PEOPLE)} said the {r.choice(PLACES)} was busy today.",
    lambda r: f"She read a book in the {r.choice(PLACES)} {r.choice(TIMES)}.",
    lambda r: f"They met the {r.choice(PEOPLE)} at the {r.choice(PLACES)}.",
    lambda r: f"It is a long way from the {r.choice(PLACES)} to the {r.choice(PLACES)}.",
    lambda r: f"He {r.choice(VERBS)} {r.choice(THINGS)} for the {r.choice(ADJ)} {r.choice(PEOPLE)}.",
]


def sentences(n: int = N, seed: int = SEED) -> list[str]:
    """`n` distinct sentences of at most MAX_CHARS characters, the patterns tried in turn."""
    rng = random.Random(seed)
    out, seen = [], set()
    for attempt in range(100 * n):
        if len(out) == n:
            break
        text = PATTERNS[attempt % len(PATTERNS)](rng)
        if len(text) <= MAX_CHARS and text not in seen:
            seen.add(text)
            out.append(text)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    args.out.write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences()))
    print(f"wrote {N} sentences to {args.out}")


if __name__ == "__main__":
    main()
