"""The bundled facts task: its splits, its rows, the config names that reach it, and the committed
files equal to what scripts/make_facts_data.py writes from Debian's bsdgames package."""

from __future__ import annotations

import doctest
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from jlora.errors import DataError
from jlora.training.data.config import DataConfig
from jlora.training.data.prompt import data_format
from jlora.training.data.sources import Example, bundled_file, read_examples
from jlora.training.run.config import from_dict

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "scripts" / "make_facts_data.py"
FILES = {"train": "facts_train.jsonl", "validation": "facts_val.jsonl", "memorise": "facts_memorise_val.jsonl"}
SOURCES = {"africa", "america", "asia", "europe", "province", "state", "elements", "collectives", "babies", "sexes"}
SOURCES |= {"pres", "chinese", "morse"}


def load_generator():
    spec = importlib.util.spec_from_file_location("make_facts_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


generator = load_generator()


def rows(split: str) -> list[dict]:
    return [json.loads(line) for line in bundled_file(split, "facts").read_text("utf-8").splitlines()]


SPLITS = {split: rows(split) for split in FILES}


def needs_debian():
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        pytest.skip("needs apt-get and dpkg to fetch Debian's bsdgames package")


@pytest.fixture(scope="module")
def quiz_dir(tmp_path_factory) -> Path:
    """bsdgames' quiz folder, downloaded and unpacked as the script does it."""
    needs_debian()
    return generator.download(tmp_path_factory.mktemp("bsdgames"))


# --- the rows -----------------------------------------------------------------------------------------------------


def test_sizes_and_sources():
    sizes = {split: len(r) for split, r in SPLITS.items()}
    assert sizes == {"train": 806, "validation": 182, "memorise": 182}
    assert 900 <= sizes["train"] + sizes["validation"] <= 1100 and 150 <= sizes["validation"] <= 200
    per_source = {split: Counter(r["source"] for r in records) for split, records in SPLITS.items()}
    assert set(per_source["train"]) == set(per_source["validation"]) == {f"bsdgames quiz/{s}" for s in SOURCES}
    assert per_source["memorise"] == per_source["validation"]  # the same size per source: the two variants compare
    for source, n in per_source["validation"].items():  # each source's share of validation is ~18 %
        assert abs(n / (n + per_source["train"][source]) - generator.VAL_SHARE) < 0.06, source


@pytest.mark.parametrize("split", FILES)
def test_every_row_is_a_short_named_pair(split):
    questions = [r["question"] for r in SPLITS[split]]
    assert len(set(questions)) == len(questions)
    for r in SPLITS[split]:
        assert set(r) <= {"question", "answer", "answers", "source"} and {"question", "answer", "source"} <= set(r)
        assert re.fullmatch(r"bsdgames quiz/[a-z]+", r["source"]), r
        assert r["question"].endswith("?") and r["answer"] and r["answer"] == r["answer"].strip(), r
        assert len(r["answer"]) <= 30 and len(r["question"]) <= 90, r
        if "answers" in r:  # alternatives only when there are some, the answer first
            assert r["answers"][0] == r["answer"] and len(set(r["answers"])) == len(r["answers"]) > 1, r
        assert "\b" not in r["question"] + r["answer"] and "[" not in r["answer"] and "{" not in r["answer"], r


def test_worked_examples():
    everything = {r["question"]: r for records in SPLITS.values() for r in records}
    expected = {
        "What is the capital of Kenya?": "Nairobi",
        "What is the capital of Cameroon?": "Yaoundé",  # overstruck accents decoded
        "What is the capital of the US state of Georgia?": "Atlanta",  # not the country's Tbilisi
        "What is the capital of Georgia?": "Tbilisi",
        "What is the chemical symbol of iron?": "Fe",
        "What is the atomic number of iron?": "26",
        "Which element has the chemical symbol Fe?": "Iron",
        "What is a group of crows called?": "a murder",
        "What is a group of ravens called?": "an unkindness",
        "What is the female counterpart of a ram?": "a ewe",
        "Who was the 16th president of the United States?": "Abraham Lincoln",
        "Who was the 32nd president of the United States?": "Franklin D. Roosevelt",
        "Who succeeded James Buchanan as president of the United States?": "Abraham Lincoln",
        "In what year did Abraham Lincoln become president of the United States?": "1861",
        "What is the letter A in Morse code?": ".-",
    }
    assert {q: everything[q]["answer"] for q in expected} == expected
    assert everything["What is the capital of Egypt?"]["source"] == "bsdgames quiz/africa"  # also in asia: one row
    assert everything["What is a group of whales called?"]["answers"] == ["a gam", "a pod", "a school"]  # two lines
    assert not [q for q in everything if "Netherlands Antilles" in q or "chemical symbol Lw" in q]


# --- the splits ---------------------------------------------------------------------------------------------------


def test_generalisation_holds_out_whole_facts(quiz_dir):
    train, val = SPLITS["train"], SPLITS["validation"]
    assert not {r["question"] for r in train} & {r["question"] for r in val}
    # the script's facts: no fact has a question on each side
    pairs, _ = generator.make_pairs(quiz_dir)
    fact = {p.question: p.fact for p in pairs}
    assert not {fact[r["question"]] for r in train} & {fact[r["question"]] for r in val}
    assert {r["question"] for r in train + val} == set(fact)  # every pair made is in one of the two

    # the same, without the script's facts: an element, a state, a Morse letter or a president is on one side
    def subjects(records, source, patterns):
        found = set()
        for r in records:
            if r["source"] == f"bsdgames quiz/{source}":
                for pattern in patterns:
                    if m := re.fullmatch(pattern, r["question"]):
                        found |= {m.group(1).lower(), r["answer"].lower()}
        return found

    element = [r"What is the chemical symbol of (.+)\?", r"Which element has the chemical symbol (.+)\?"]
    element += [r"What is the atomic number of (.+)\?"]
    state = [r"What is the (?:capital|postal abbreviation) of the US state of (.+)\?"]
    morse = [r"What is the letter (.) in Morse code\?", r"Which letter is (.+) in Morse code\?"]
    for source, patterns in [("elements", element), ("state", state), ("morse", morse)]:
        assert not subjects(train, source, patterns) & subjects(val, source, patterns), source

    def presidents(records):  # whose presidency a row asks about: the answer, or the year's subject
        found = set()
        for r in records:
            if r["source"] == "bsdgames quiz/pres":
                year = re.fullmatch(r"In what year did (.+) become president of the United States\?", r["question"])
                found.add(year.group(1) if year else r["answer"])
        return found

    assert not presidents(train) & presidents(val)


def test_memorisation_asks_training_rows():
    train = {json.dumps(r) for r in SPLITS["train"]}
    assert all(json.dumps(r) in train for r in SPLITS["memorise"])


# --- the config names ---------------------------------------------------------------------------------------------


def test_config_names_resolve_through_read_examples():
    first = SPLITS["train"][0]
    examples = read_examples("bundled:facts", split="train")  # data.train: bundled:facts
    assert len(examples) == 806
    assert examples[0] == Example(f"Question: {first['question']}\nAnswer:", f" {first['answer']}")
    for name, split in [("bundled:facts", "validation"), ("bundled:facts:memorise", "memorise")]:
        # data.validation: read with split "validation"; a split in the name is used instead
        got = read_examples(name, split="validation")
        assert [e.prompt for e in got] == [f"Question: {r['question']}\nAnswer:" for r in SPLITS[split]]
    assert read_examples("bundled:facts", split="val") == read_examples("bundled:facts", split="validation")
    assert read_examples("bundled:qa", split="train") == read_examples("bundled", split="train")  # the QA task, as was
    assert data_format(DataConfig(train="bundled:facts")) == "qa"  # so `jlora generate` wraps a question
    from_dict({"data": {"train": "bundled:facts", "validation": "bundled:facts:memorise"}})  # a valid config


@pytest.mark.parametrize(
    "source, split, message",
    [
        ("bundled:facts", "generic", "facts task has splits 'train', 'validation' and 'memorise', not 'generic'"),
        ("bundled:fact", "train", "the bundled tasks are 'qa', 'facts', not 'fact'"),
        ("bundled:facts:train:x", "train", "'bundled', 'bundled:TASK' or 'bundled:TASK:SPLIT'"),
    ],
)
def test_bad_bundled_names(source, split, message):
    with pytest.raises(DataError, match=re.escape(message)):
        read_examples(source, split=split)


# --- the script ---------------------------------------------------------------------------------------------------


def test_the_scripts_docstrings():
    assert doctest.testmod(generator).failed == 0


def test_the_script_writes_the_committed_files(tmp_path):
    """Downloads bsdgames, as the script does by default, and compares bytes."""
    needs_debian()
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    for split, name in FILES.items():
        assert (tmp_path / name).read_bytes() == bundled_file(split, "facts").read_bytes(), name
    out = result.stdout
    assert "wrote 806 pairs" in out and "wrote 182 pairs" in out and "state: 50 flower fields" in out
    assert "elements: 2 questions - Lawrencium's symbol 'Lw' was withdrawn" in out
    assert len(re.findall(r"lines - whole file:", out)) == len(generator.LEFT_OUT)
