"""Write jlora's bundled facts task from Debian's ``bsdgames`` quiz files (BSD licence).

    python scripts/make_facts_data.py                     # apt-get download bsdgames, rewrite jlora/data/facts_*
    python scripts/make_facts_data.py --quiz-dir DIR      # an unpacked .../games/bsdgames/quiz folder instead

Real facts as short question-answer pairs for real-model experiments (the source document's
data-size question: what an adapter of rank r learns from about 1,000 pairs). The question forms,
by quiz file::

    africa america asia europe  What is the capital of Kenya?                              Nairobi
    province    What is the capital of the Canadian province of Ontario?                   Toronto
    state       What is the capital of the US state of Ohio?                               Columbus
                What is the postal abbreviation of the US state of Ohio?                   OH
    elements    What is the chemical symbol of iron?                                       Fe
                Which element has the chemical symbol Fe?                                  Iron
                What is the atomic number of iron?                                         26
    collectives What is a group of crows called?                                           a murder
    babies      What is a baby kangaroo called?                                            a joey
    sexes       What is the female counterpart of a stallion?                              a mare
    pres        Who was the 16th president of the United States?                           Abraham Lincoln
                Who succeeded James Buchanan as president of the United States?            Abraham Lincoln
                In what year did Abraham Lincoln become president of the United States?    1861
    chinese     In the Chinese zodiac, which animal comes after the rabbit?                the dragon
    morse       What is the letter A in Morse code?                                        .-
                Which letter is .- in Morse code?                                          A

A quiz line is colon-separated fields, each a pattern: ``a|b`` alternatives, ``{x}`` optional,
``[x]`` a group, ``\\`` a continued line (the ``index`` file names each file's fields, and is
checked). A pattern's fullest expansion (optional parts kept, first alternatives) is the answer;
its other expansions are the row's ``answers``. Accented letters are overstruck, ``['<BS>e|e<BS>'|e]``:
they become ``é`` (and ``e`` in the alternatives). US presidents are written "first name, middle
initials, surname" ("Franklin D. Roosevelt"), with the full name and the surname as alternatives.
Answers are the source's (bsdgames 2.17-29, Debian): "Kiev" before "Kyiv", "Kotte", "Quebec".

Left out, each counted and printed with its reason: whole files that are not short facts
(arithmetic, verse, legal and editor commands, glosses, word puzzles, fiction, jokes, dated area
codes, specialist trivia); the atomic weights (dated values, some only mass numbers) and the state
flowers ("gok" for two states, a pine cone for Maine, misspellings); and single lines or questions:
the dissolved Netherlands Antilles, Lawrencium's withdrawn symbol "Lw", a joke collective, the
non-noun pairs of ``sexes``, Grover Cleveland's year and successor (two terms, two answers each)
and Obama's empty successor field. A question asked twice (Egypt is in Africa and Asia) is one row.

Splits, all seeded and fixed (the same bytes on every run)::

    facts_train.jsonl           the training pairs
    facts_val.jsonl             generalisation: facts never seen in training (all the questions on one
                                fact, such as an element's symbol, number and name, go to one side),
                                the same share of every source file
    facts_memorise_val.jsonl    memorisation: as many training pairs, per source, as facts_val holds

Each row: ``{"question", "answer", "answers" (only when there are alternatives), "source"}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

SEED = 0
VAL_SHARE = 0.18  # of each source file's rows: ~180 validation pairs of ~1,000
OUT = Path(__file__).resolve().parent.parent / "jlora" / "data"
QUIZ = "usr/share/games/bsdgames/quiz"  # inside the .deb
FILES = {  # file -> its categories in the quiz `index` (checked, so a changed package fails loudly)
    "africa": "Africa{n}:cap{ital}",
    "america": "America{n}:cap{ital}",
    "asia": "Asia{n}:cap{ital}",
    "europe": "Europe{an}:cap{ital}",
    "province": "province:cap{ital}",
    "state": "state:cap{ital}:abbr{ev{iation}}:flower",
    "elements": "symbol:number:weight:element",
    "collectives": "ind{ividuals}:coll{ective}",
    "babies": "baby:adult",
    "sexes": "male:female",
    "pres": "pres{ident}:term:vice:succ{essor}",
    "chinese": "{Chinese{-}}year:next",
    "morse": "clear|alpha{bet{ic}}:morse",
}
LEFT_OUT = {  # file -> why none of its lines are used
    "arith": "arithmetic, not facts (jlora's QA task has its own)",
    "mult": "arithmetic, not facts (jlora's QA task has its own)",
    "bard": "verse: answers are whole lines",
    "poetry": "verse: answers are whole lines",
    "ed": "editor commands, not short facts",
    "ucc": "legal code section titles, not short facts",
    "latin": "glosses with several senses each",
    "greek": "transliterated with $...$ markup",
    "flowers": "answers are phrases (the language of flowers)",
    "posneg": "antonyms, not facts; some lines pair unrelated words",
    "seq-easy": "number puzzles, not facts",
    "seq-hard": "number puzzles, not facts",
    "spell": "spelling puzzles",
    "midearth": "fiction",
    "murders": "mostly jokes ('the CIA')",
    "trek": "fragments, not questions; fiction",
    "areas": "dated telephone area codes, many answers empty",
    "sov": "mixes monarchs with Lord Protectors and a play's two parts; ambiguous centuries",
    "inca": "specialist trivia, lower-case names",
    "locomotive": "specialist trivia; repeated keys with conflicting answers",
}
NAMES = {  # the source's fullest form -> the name used (of a country in a question, of a capital as answer)
    "Central African Republic": "the Central African Republic",
    "DR Congo": "the Democratic Republic of the Congo",
    "Republic of South Africa": "South Africa",
    "Rep. Congo": "the Republic of the Congo",
    "Malagasy Republic": "Madagascar",
    "SGSSI": "South Georgia and the South Sandwich Islands",
    "People's Republic of China": "China",
    "Republic of Yemen": "Yemen",
    "P'yongyang": "Pyongyang",
}
# names English says with "the": "the United Kingdom", "the Netherlands"
THE = re.compile(r"(Islands|Republic|Emirates|States|Kingdom)$|^(Isle of |Netherlands|Philippines|Maldives)")
ACCENTS = {"'": "\u0301", "^": "\u0302", "~": "\u0303", "°": "\u030a", ",": "\u0327"}
LETTERS = {",s": "ș", "/o": "ø"}  # no combining form: the letter itself


@dataclasses.dataclass(frozen=True)
class Pair:
    """One question; `answers[0]` is the answer. Pairs with one `fact` go to one side of the split."""

    question: str
    answers: tuple[str, ...]
    source: str  # the quiz file
    fact: str

    def row(self) -> dict:
        row = {"question": self.question, "answer": self.answers[0]}
        if len(self.answers) > 1:
            row["answers"] = list(self.answers)
        return {**row, "source": f"bsdgames quiz/{self.source}"}


# --- the quiz pattern language ------------------------------------------------------------------------------------


def _unique(items) -> list:
    return list(dict.fromkeys(items))


def _accented(alternatives: list[str]) -> list[str]:
    """A ``[...]`` group's accent spellings (overstruck: "'<BS>e", "e<BS>'") as the letter ("é")."""

    def letter(alt: str) -> str:
        if "\b" not in alt:
            return alt
        alt = alt.replace("\b", "")
        if alt in LETTERS or alt[::-1] in LETTERS:
            return LETTERS.get(alt) or LETTERS[alt[::-1]]
        if len(alt) == 2 and (alt[0] in ACCENTS) != (alt[1] in ACCENTS):
            mark, base = (alt[0], alt[1]) if alt[0] in ACCENTS else (alt[1], alt[0])
            return unicodedata.normalize("NFC", base + ACCENTS[mark]) if base.isalpha() else alt
        return alt

    return _unique(letter(alt) for alt in alternatives)


def _parse(text: str, i: int, close: str | None) -> tuple[list[str], int]:
    alternatives, current = [], [""]
    while i < len(text) and text[i] != close:
        c = text[i]
        if c == "|":
            alternatives += current
            current, i = [""], i + 1
            continue
        if c in "{[":
            inner, i = _parse(text, i + 1, "}" if c == "{" else "]")
            if i >= len(text):
                raise ValueError(f"unclosed {c!r} in {text!r}")
            i += 1
            inner = inner + [""] if c == "{" else _accented(inner)
        elif c in "}]":
            raise ValueError(f"unexpected {c!r} in {text!r}")
        else:
            if c == "\\":
                i += 1
            inner, i = [text[i]], i + 1
        current = [a + b for a in current for b in inner]
    return _unique(alternatives + current), i


def expand(pattern: str) -> list[str]:
    """Every string a quiz pattern matches, the fullest first.

    >>> expand("Washington{ DC}"), expand("Yaound['\\be|e\\b'|e]"), expand("Ha[v|b]ana")
    (['Washington DC', 'Washington'], ['Yaoundé', 'Yaounde'], ['Havana', 'Habana'])
    """
    return [s.strip() for s in _parse(pattern, 0, None)[0] if s.strip()]


def top_level(pattern: str, sep: str = "|") -> list[str]:
    """`pattern` split at `sep` outside brackets and braces.

    >>> top_level("{H|h}uns|{wild }swine")
    ['{H|h}uns', '{wild }swine']
    """
    parts, depth, start = [], 0, 0
    for i, c in enumerate(pattern):
        depth += c in "{[" and (i == 0 or pattern[i - 1] != "\\")
        depth -= c in "}]" and (i == 0 or pattern[i - 1] != "\\")
        if c == sep and depth == 0 and (i == 0 or pattern[i - 1] != "\\"):
            parts.append(pattern[start:i])
            start = i + 1
    return [*parts, pattern[start:]]


def fullest(pattern: str) -> str:
    return expand(pattern)[0]


def quiz_lines(path: Path) -> Iterator[list[str]]:
    """A quiz file's logical lines (backslash-continued lines joined), as lists of fields."""
    text = path.read_text("utf-8").replace("\\\n", "")
    for line in text.splitlines():
        if line.strip():
            yield top_level(line, ":")


# --- questions, file by file --------------------------------------------------------------------------------------


class Skips(Counter):
    """(file, what, reason) -> how many were left out; `what` is "lines", "questions" or a field's name."""

    def skip(self, file: str, what: str, reason: str, n: int = 1) -> None:
        self[(file, what, reason)] += n


def article(noun: str) -> str:
    """ "a murder", "an exaltation", "a ewe"."""
    vowel = noun[0].lower() in "aeiou" and not noun.lower().startswith(("eu", "ew", "uni", "us"))
    return f"{'an' if vowel else 'a'} {noun}"


def country(pattern: str) -> str:
    """The name a question uses: NAMES' if it has one, else the source's with "the" where English has it.

    >>> country("{The }Gambia"), country("Czech Republic"), country("{Rep{ublic} of }South Africa")
    ('the Gambia', 'the Czech Republic', 'South Africa')
    """
    name = fullest(top_level(pattern)[0])
    if name in NAMES:
        return NAMES[name]
    if name.startswith("The "):  # the source's "The Gambia"
        return "the " + name[4:]
    return f"the {name}" if THE.search(name) else name


def capitals(file: str, lines, skips: Skips) -> Iterator[Pair]:
    for subject, capital in lines:
        name = country(subject)
        if name == "the Netherlands Antilles":
            skips.skip(file, "lines", "dissolved in 2010 (the Netherlands Antilles)")
            continue
        answers = tuple(NAMES.get(a, a) for a in expand(capital))
        yield Pair(f"What is the capital of {name}?", tuple(_unique(answers)), file, f"country:{name}")


def provinces(file: str, lines, skips: Skips) -> Iterator[Pair]:
    for subject, capital in lines:
        name = fullest(subject)
        if name == "Canada":  # the country, asked as in `america`
            yield from capitals(file, [(subject, capital)], skips)
            continue
        place = f"Canada's {name}" if "Territor" in name else f"the Canadian province of {name}"
        yield Pair(f"What is the capital of {place}?", tuple(expand(capital)), file, f"province:{name}")


def states(file: str, lines, skips: Skips) -> Iterator[Pair]:
    for subject, capital, abbreviation, _flower in lines:
        name = fullest(top_level(subject)[0])
        fact = f"state:{name}"
        yield Pair(f"What is the capital of the US state of {name}?", tuple(expand(capital)), file, fact)
        abbreviations = tuple(_unique(a for alt in top_level(abbreviation) for a in expand(alt)))
        yield Pair(f"What is the postal abbreviation of the US state of {name}?", abbreviations, file, fact)
    skips.skip(file, "flower fields", "'gok' for two states, a pine cone for Maine, misspellings", len(lines))


def elements(file: str, lines, skips: Skips) -> Iterator[Pair]:
    for symbol, number, _weight, element in lines:
        fact = f"element:{element}"
        if symbol == "Lw":
            skips.skip(file, "questions", "Lawrencium's symbol 'Lw' was withdrawn (now Lr)", 2)
        else:
            yield Pair(f"What is the chemical symbol of {element.lower()}?", (symbol,), file, fact)
            yield Pair(f"Which element has the chemical symbol {symbol}?", (element,), file, fact)
        yield Pair(f"What is the atomic number of {element.lower()}?", (number,), file, fact)
    skips.skip(file, "weight fields", "dated values, some only mass numbers", len(lines))


def collectives(file: str, lines, skips: Skips) -> Iterator[Pair]:
    for individuals, collective in lines:
        if "at&t" in collective:
            skips.skip(file, "lines", "a joke ('operating companies: at&t')")
            continue
        answers = tuple(article(a) for alt in top_level(collective) for a in expand(alt))
        for subject in top_level(individuals):
            name = fullest(subject)
            yield Pair(f"What is a group of {name} called?", answers, file, f"collective:{name}")


def babies(file: str, lines, skips: Skips) -> Iterator[Pair]:
    for baby, adults in lines:
        answers = tuple(article(b) for alt in top_level(baby) for b in expand(alt))
        for adult in top_level(adults):
            name = fullest(adult)
            yield Pair(f"What is a baby {name} called?", answers, file, f"baby:{name}")


def sexes(file: str, lines, skips: Skips) -> Iterator[Pair]:
    for male, female in lines:
        name = fullest(top_level(male)[0])
        if name in ("Y", "effeminate", "manly", "Oedipus complex"):
            skips.skip(file, "lines", "not a pair of nouns (a letter, adjectives, a complex)")
            continue
        answers = tuple(article(f) for alt in top_level(female) for f in expand(alt))
        yield Pair(f"What is the female counterpart of {article(name)}?", answers, file, f"male:{name}")


def president(pattern: str) -> tuple[str, str, str]:
    """(first name, middle initials and surname; the full name; the surname) of a `pres` pattern.

    >>> president("{F{ranklin} }{D{elano} }Roosevelt|FDR")
    ('Franklin D. Roosevelt', 'Franklin Delano Roosevelt', 'Roosevelt')
    >>> president("{J{ames} }{E{arl} }Carter{{,} J{unio}r}")[0], president("{H{arry} }{S }Truman")[0]
    ('James E. Carter', 'Harry S. Truman')
    """
    pattern, given = top_level(pattern)[0], []
    while pattern.startswith("{"):  # the leading optional groups are the given names
        end = _closing(pattern)
        given.append(fullest(pattern[1:end]))
        pattern = pattern[end + 1 :]
    surname = fullest(pattern.split("{", 1)[0])  # what follows (", Junior", " II", " (1st term)") is left out
    short = " ".join([given[0], *(f"{g[0]}." for g in given[1:]), surname])
    return short, " ".join([*given, surname]), surname


def _closing(text: str) -> int:
    """The index of the brace that closes the one `text` opens with."""
    depth = 0
    for i, c in enumerate(text):
        depth += (c == "{") - (c == "}")
        if depth == 0:
            return i
    raise ValueError(f"unclosed '{{' in {text!r}")


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def presidents(file: str, lines, skips: Skips) -> Iterator[Pair]:
    names = [president(line[0]) for line in lines]
    twice = {short for short, _, _ in names if sum(n[0] == short for n in names) > 1}
    usa = "president of the United States"
    for n, ((_name, term, _vice, successor), answers) in enumerate(zip(lines, names), 1):
        short = answers[0]
        answers = tuple(_unique(answers))
        yield Pair(f"Who was the {ordinal(n)} {usa}?", answers, file, f"president:{short}")
        if short in twice:
            skips.skip(file, "questions", f"{short} served twice: the year and successor questions have two answers", 2)
            continue
        yield Pair(f"In what year did {short} become {usa}?", (term[:4],), file, f"president:{short}")
        if not successor.strip():
            skips.skip(file, "questions", f"no successor given for {short} (the file predates it)")
            continue
        after = tuple(_unique(president(successor)))
        yield Pair(f"Who succeeded {short} as {usa}?", after, file, f"president:{after[0]}")


def zodiac(file: str, lines, skips: Skips) -> Iterator[Pair]:
    for year, following in lines:
        question = f"In the Chinese zodiac, which animal comes after the {year}?"
        yield Pair(question, (f"the {following}",), file, f"zodiac:{year}")


def morse(file: str, lines, skips: Skips) -> Iterator[Pair]:
    for letter, code in lines:
        yield Pair(f"What is the letter {letter} in Morse code?", (code,), file, f"morse:{letter}")
        yield Pair(f"Which letter is {code} in Morse code?", (letter,), file, f"morse:{letter}")


READERS = {
    "africa": capitals,
    "america": capitals,
    "asia": capitals,
    "europe": capitals,
    "province": provinces,
    "state": states,
    "elements": elements,
    "collectives": collectives,
    "babies": babies,
    "sexes": sexes,
    "pres": presidents,
    "chinese": zodiac,
    "morse": morse,
}


def check_index(quiz_dir: Path) -> None:
    """The package's `index` names every file read here with the fields read here, and nothing unknown."""
    index = {}
    for line in (quiz_dir / "index").read_text("utf-8").splitlines():
        path, _, categories = line.partition(":")
        index[Path(path).name] = categories
    for file, categories in FILES.items():
        if index.get(file) != categories:
            fail(f"the quiz index has {file}:{index.get(file)!r}, expected {categories!r}")
    unknown = sorted(set(index) - set(FILES) - set(LEFT_OUT))
    if unknown:
        fail(f"quiz files this script does not know: {', '.join(unknown)}")


def make_pairs(quiz_dir: Path) -> tuple[list[Pair], Skips]:
    """Every pair, in file order; a question asked twice (Egypt is in Africa and Asia) is one pair,
    its answers merged. Returns the pairs and what was left out."""
    check_index(quiz_dir)
    skips, pairs = Skips(), {}
    for file in LEFT_OUT:
        skips.skip(file, "lines", f"whole file: {LEFT_OUT[file]}", sum(1 for _ in quiz_lines(quiz_dir / file)))
    for file, read in READERS.items():
        lines = list(quiz_lines(quiz_dir / file))
        for pair in read(file, lines, skips):
            first = pairs.get(pair.question)
            if first is None:
                pairs[pair.question] = pair
                continue
            if first.fact != pair.fact:
                raise ValueError(f"{pair.question!r} asks about two facts: {first.fact}, {pair.fact}")
            pairs[pair.question] = dataclasses.replace(first, answers=tuple(_unique(first.answers + pair.answers)))
            skips.skip(file, "questions", "asked again (another file or line): answers merged into the first")
    return list(pairs.values()), skips


# --- splits -------------------------------------------------------------------------------------------------------


def make_splits(pairs: list[Pair], seed: int = SEED) -> tuple[list[Pair], list[Pair], list[Pair]]:
    """(train, validation, memorise): validation holds whole facts, VAL_SHARE of each source's rows;
    memorise is as many training pairs per source. Each list is in a seeded random order, so that
    its first rows (what an evaluation of a few batches, or exact match on n rows, reads) mix every source."""
    facts: dict[str, list[str]] = {}  # source -> its facts, in order
    for pair in pairs:
        facts.setdefault(pair.source, [])
        if pair.fact not in facts[pair.source]:
            facts[pair.source].append(pair.fact)
    size = Counter(pair.fact for pair in pairs)
    val_facts, quota = set(), {}
    for source, keys in facts.items():
        target = round(VAL_SHARE * sum(size[f] for f in keys))
        order = sorted(keys)
        random.Random(f"{seed}:validation:{source}").shuffle(order)
        taken = 0
        for fact in order:
            if taken >= target:
                break
            val_facts.add(fact)
            taken += size[fact]
        quota[source] = taken
    train = [p for p in pairs if p.fact not in val_facts]
    val = [p for p in pairs if p.fact in val_facts]
    chosen = set()
    for source, n in quota.items():
        questions = sorted(p.question for p in train if p.source == source)
        chosen |= set(random.Random(f"{seed}:memorise:{source}").sample(questions, n))
    memorise = [p for p in train if p.question in chosen]
    splits = {"train": train, "validation": val, "memorise": memorise}
    return tuple(random.Random(f"{seed}:order:{k}").sample(v, len(v)) for k, v in splits.items())


def to_jsonl(pairs: list[Pair]) -> str:
    return "".join(json.dumps(p.row(), ensure_ascii=False) + "\n" for p in pairs)


SPLITS = {"facts_train.jsonl": 0, "facts_val.jsonl": 1, "facts_memorise_val.jsonl": 2}


def write(quiz_dir: Path, out: Path, seed: int = SEED) -> None:
    pairs, skips = make_pairs(quiz_dir)
    splits = make_splits(pairs, seed)
    out.mkdir(parents=True, exist_ok=True)
    for name, k in SPLITS.items():
        (out / name).write_text(to_jsonl(splits[k]), encoding="utf-8")
        per_source = Counter(p.source for p in splits[k])
        counts = ", ".join(f"{file} {per_source[file]}" for file in READERS if per_source[file])
        print(f"wrote {len(splits[k])} pairs to {out / name} ({counts})")
    print("skipped:")
    for (file, what, reason), n in skips.items():
        print(f"  {file}: {n} {what} - {reason}")


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _run(command: list[str], cwd: Path) -> None:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        fail(f"{' '.join(command)} failed: {last}")


def download(folder: Path) -> Path:
    """bsdgames' quiz folder, from `apt-get download` and `dpkg -x` into `folder`."""
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            fail(f"{tool} not found; pass --quiz-dir with an unpacked bsdgames quiz folder")
    _run(["apt-get", "download", "bsdgames"], folder)
    deb = next(folder.glob("bsdgames_*.deb"))
    _run(["dpkg", "-x", str(deb), str(folder / "pkg")], folder)
    print(f"unpacked {deb.name}")
    return folder / "pkg" / QUIZ


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quiz-dir", type=Path, help="an unpacked bsdgames quiz folder (default: download it)")
    parser.add_argument("--out", type=Path, default=OUT, help="output directory (default: the package's data/)")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    if args.quiz_dir is not None:
        write(args.quiz_dir, args.out, args.seed)
        return
    with tempfile.TemporaryDirectory(prefix="bsdgames-") as folder:
        write(download(Path(folder)), args.out, args.seed)


if __name__ == "__main__":
    sys.exit(main())
