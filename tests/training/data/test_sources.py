"""Reading and validating records (every format, every bad line named), and the bundled QA task."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from jlora.errors import DataError
from jlora.training.data.sources import Example, bundled_file, read_examples
from jlora.training.data.tokenizer import ByteTokenizer

BYTES = ByteTokenizer()
ROOT = Path(__file__).resolve().parents[3]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --- reading ---------------------------------------------------------------------------------------------------


def test_three_formats_and_the_qa_template(tmp_path):
    qa = write_jsonl(tmp_path / "qa.jsonl", ['{"question": "What is 2 plus 3?", "answer": "5", "id": 7}'])
    pc = write_jsonl(tmp_path / "pc.jsonl", ['{"prompt": "", "completion": "x"}', '{"prompt": "a", "completion": "b"}'])
    text = write_jsonl(tmp_path / "text.jsonl", ['{"text": "hello"}'])
    assert read_examples(str(qa)) == [Example("Question: What is 2 plus 3?\nAnswer:", " 5")]
    assert read_examples(str(pc)) == [Example("", "x"), Example("a", "b")]
    assert read_examples(str(text)) == [Example("", "hello")]
    # a record with both kinds of keys is QA unless the format is named
    both = write_jsonl(tmp_path / "both.jsonl", ['{"question": "q", "answer": "a", "text": "t"}'])
    assert read_examples(str(both)) == [Example("Question: q\nAnswer:", " a")]
    assert read_examples(str(both), fmt="text") == [Example("", "t")]


BAD_LINES = [
    ('{"question": "q", "answer": "a"', "invalid JSON"),
    ('{"question": "q"}', "missing key 'answer'"),
    ('{"question": "q", "answer": 42}', "'answer' must be a string, got int"),
    ("", "empty line"),
    ('{"question": "q", "answer": "  "}', "'answer' is empty"),
    ('["q", "a"]', "expected a JSON object"),
]


@pytest.mark.parametrize("line, reason", BAD_LINES)
def test_a_bad_line_names_file_and_line(tmp_path, line, reason):
    good = '{"question": "q", "answer": "a"}'
    path = write_jsonl(tmp_path / "data.jsonl", [good, good, line, good])
    with pytest.raises(DataError) as e:
        read_examples(str(path))
    message = str(e.value)
    assert f"{path}, line 3: " in message and reason in message and "\n" not in message


def test_unreadable_sources(tmp_path):
    first = write_jsonl(tmp_path / "keys.jsonl", ['{"q": "x", "a": "y"}'])
    with pytest.raises(DataError, match=r"keys\.jsonl, line 1: cannot tell the format"):
        read_examples(str(first))
    with pytest.raises(DataError, match="no data file"):
        read_examples(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="no examples"):
        read_examples(str(write_jsonl(tmp_path / "empty.jsonl", [])))
    with pytest.raises(DataError, match="unknown data format"):
        read_examples(str(first), fmt="chat")
    with pytest.raises(DataError, match="splits 'train' and 'validation'"):
        read_examples("bundled", split="test")


def test_datasets_local_json_matches_the_direct_reader(tmp_path):
    lines = ['{"question": "What is 1 plus 1?", "answer": "2"}', '{"question": "Reverse the word ab.", "answer": "ba"}']
    path = write_jsonl(tmp_path / "qa.jsonl", lines)
    via_datasets = read_examples("json", data_files=str(path), cache_dir=str(tmp_path / "cache"))
    assert via_datasets == read_examples(str(path))
    bad = write_jsonl(tmp_path / "bad.jsonl", [lines[0], '{"question": "q"}'])  # datasets fills the gap with None
    with pytest.raises(
        DataError, match=r"dataset 'json' split 'train', row 2: 'answer' must be a string, got NoneType"
    ):
        read_examples("json", data_files=str(bad), cache_dir=str(tmp_path / "cache"))


# --- the bundled QA task ---------------------------------------------------------------------------------------


def load_generator():
    spec = importlib.util.spec_from_file_location("make_qa_data", ROOT / "scripts" / "make_qa_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RULES = [  # each template's answer recomputed from its question
    (r"What is (\d+) plus (\d+)\?", lambda a, b: str(int(a) + int(b))),
    (r"What is (\d+) minus (\d+)\?", lambda a, b: str(int(a) - int(b))),
    (r"What number comes after (\d+)\?", lambda n: str(int(n) + 1)),
    (r"Is (\d+) even or odd\?", lambda n: ["even", "odd"][int(n) % 2]),
    (r"Reverse the word (\w+)\.", lambda w: "".join(reversed(w))),
    (r"Write (\w+) in capital letters\.", str.upper),
    (r"How many letters are in (\w+)\?", lambda w: str(len(w))),
    (r"What is the last letter of (\w+)\?", lambda w: w[-1]),
]


def test_bundled_qa_files():
    generator = load_generator()
    splits = {}
    for split, size in [("train", 1000), ("validation", 200)]:
        raw = bundled_file(split).read_text("utf-8")  # through importlib.resources, as installed
        records = [json.loads(line) for line in raw.splitlines()]
        assert len(records) == size and len(read_examples("bundled", split=split)) == size
        splits[split] = records
    train, val = generator.make_splits()
    assert generator.to_jsonl(train) == bundled_file("train").read_text("utf-8")  # committed == regenerated
    assert generator.to_jsonl(val) == bundled_file("validation").read_text("utf-8")
    questions = {s: {r["question"] for r in records} for s, records in splits.items()}
    assert len(questions["train"]) == 1000 and len(questions["validation"]) == 200
    assert not questions["train"] & questions["validation"]
    for split, records in splits.items():
        per_template = [0] * len(RULES)
        for r in records:
            assert len(f"Question: {r['question']}\nAnswer: {r['answer']}".encode()) < 80
            k, match = next((k, m) for k, (p, _) in enumerate(RULES) if (m := re.fullmatch(p, r["question"])))
            assert RULES[k][1](*match.groups()) == r["answer"], r
            per_template[k] += 1
        assert per_template == [len(records) // len(RULES)] * len(RULES), split
