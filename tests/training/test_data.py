"""Data: reading and validating records, the token layout against hand counts, batches, the bundled QA task."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jlora.training.data import (
    DataError,
    Example,
    batch_at,
    bundled_file,
    eval_batches,
    greedy_exact_match,
    prompt_tokens,
    read_examples,
    tokenize,
)
from jlora.training.tokenizer import ByteTokenizer

E = 256  # the byte tokenizer's end-of-text
BYTES = ByteTokenizer()
ROOT = Path(__file__).resolve().parents[2]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def toy_data(n: int, seq_len: int = 8):
    """n examples whose completion is the n-th letter (targets[:, 1]), so each row is recognisable."""
    return tokenize([Example("q", chr(ord("a") + i)) for i in range(n)], BYTES, seq_len)


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


# --- tokenizing ------------------------------------------------------------------------------------------------


def test_layout_against_a_hand_count():
    data = tokenize([Example("Q?", " ab"), Example("", "hi")], BYTES, seq_len=8)
    Q, q, sp, a, b, h, i = (ord(c) for c in "Q? abhi")
    # tokens: E Q ? _ a b E  and  E h i E
    assert data.input_ids.tolist() == [[E, Q, q, sp, a, b, E, E], [E, h, i, E, E, E, E, E]]
    assert data.targets.tolist() == [[Q, q, sp, a, b, E, E, E], [h, i, E, E, E, E, E, E]]
    # loss on " ab" and the closing E (not the prompt, not padding); a text counts whole, its first token too
    assert data.loss_mask.tolist() == [[0, 0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]
    assert data.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]
    assert [a.dtype for a in (data.input_ids, data.targets, data.loss_mask, data.attention_mask)] == [
        np.int32,
        np.int32,
        np.float32,
        np.int32,
    ]
    assert (data.n_truncated, data.n_dropped, data.example_index.tolist()) == (0, 0, [0, 1])


def test_bundled_train_loss_tokens_are_exactly_answer_and_end_of_text():
    records = [json.loads(line) for line in bundled_file("train").read_text("utf-8").splitlines()]
    data = tokenize(read_examples("bundled"), BYTES, seq_len=96)
    assert len(data) == len(records) and data.n_truncated == data.n_dropped == 0
    counted = data.loss_mask > 0
    # inputs are the targets shifted by one wherever a token is attended
    attended = data.attention_mask[:, 1:] > 0
    assert np.array_equal(data.input_ids[:, 1:][attended], data.targets[:, :-1][attended])
    assert not counted[data.attention_mask == 0].any()  # padding never counts
    for row, record in enumerate(records):
        answer = list(f" {record['answer']}".encode()) + [E]
        assert data.targets[row][counted[row]].tolist() == answer


def test_truncation_and_dropping_are_counted():
    examples = [
        Example("abc", "defgh"),  # 10 tokens; 7 fit: the completion keeps "de"
        Example("abcdef", "x"),  # the prompt (with its opening E) fills all 6 inputs: dropped
        Example("abcde", "xy"),  # room for exactly one completion target
        Example("a", "b"),  # fits whole
    ]
    data = tokenize(examples, BYTES, seq_len=6)
    assert (len(data), data.n_truncated, data.n_dropped, data.example_index.tolist()) == (3, 2, 1, [0, 2, 3])
    a, b, c, d, e, x = (ord(ch) for ch in "abcdex")
    assert data.input_ids[0].tolist() == [E, a, b, c, d, e]
    assert data.targets[0].tolist() == [a, b, c, d, e, ord("f")]  # cut: no closing E
    assert data.loss_mask[0].tolist() == [0, 0, 0, 1, 1, 1]
    assert data.targets[1].tolist() == [a, b, c, d, e, x] and data.loss_mask[1].tolist() == [0, 0, 0, 0, 0, 1]
    assert "2 truncated, 1 dropped" in data.summary()
    with pytest.raises(DataError, match="none of the 1 examples fits seq_len=6"):
        tokenize(examples[1:2], BYTES, seq_len=6)


# --- batches ---------------------------------------------------------------------------------------------------


def test_batch_at_is_pure_and_covers_each_epoch():
    data = toy_data(12)
    seen = [batch_at(data, step, 4, seed=3)["targets"][:, 1].tolist() for step in range(6)]
    assert sorted(sum(seen[:3], [])) == sorted(sum(seen[3:], [])) == sorted(data.targets[:, 1].tolist())
    assert seen[:3] != seen[3:]  # a new order each epoch
    backwards = [batch_at(data, step, 4, seed=3)["targets"][:, 1].tolist() for step in reversed(range(6))]
    assert backwards[::-1] == seen  # the batch depends on the step only, not on what came before
    other_seed = [batch_at(data, step, 4, seed=4)["targets"][:, 1].tolist() for step in range(3)]
    assert other_seed != seen[:3]
    batch = batch_at(data, 5, 4, seed=3)
    assert set(batch) == {"input_ids", "targets", "loss_mask", "attention_mask"}
    assert all(v.shape == (4, 8) for v in batch.values())


def test_batches_do_not_straddle_epochs():
    data = tokenize([Example("", chr(ord("a") + i)) for i in range(10)], BYTES, seq_len=4)
    rows = [batch_at(data, step, 4, seed=0)["input_ids"][:, 1].tolist() for step in range(4)]
    assert len(set(rows[0] + rows[1])) == 8  # 2 whole batches per epoch, the last 2 of its order skipped
    assert len(set(rows[2] + rows[3])) == 8 and rows[2:] != rows[:2]
    with pytest.raises(DataError, match="batch_size 11"):
        batch_at(data, 0, 11, seed=0)


def test_eval_batches_cover_the_set_in_order_with_static_shapes():
    data = toy_data(10)
    batches = list(eval_batches(data, 4))
    assert len(batches) == 3 and all(b[k].shape == (4, 8) for b in batches for k in b)
    ids = np.concatenate([b["input_ids"] for b in batches])
    assert np.array_equal(ids[:10], data.input_ids)
    mask = np.concatenate([b["loss_mask"] for b in batches])
    assert np.array_equal(mask[:10], data.loss_mask) and not mask[10:].any()
    assert (np.concatenate([b["attention_mask"] for b in batches])[10:] == data.attention_mask[-1]).all()


# --- exact match -----------------------------------------------------------------------------------------------


def bigram_next(token: int) -> int:
    """A toy greedy model: letters step to the next letter, 'z' ends the text, ':' -> ' ' -> 'v'."""
    if ord("a") <= token < ord("z"):
        return token + 1
    return {ord("z"): E, ord(":"): ord(" "), ord(" "): ord("v")}.get(token, ord("?"))


def test_greedy_exact_match_equals_greedy_decoding():
    examples = [Example("Q:", " vwxyz"), Example("Q:", " vwx"), Example("R;", " vwxyz"), Example("Qz:", " vwxyz")]
    data = tokenize(examples, BYTES, seq_len=12)
    predictions = np.vectorize(bigram_next)(data.input_ids)  # teacher forcing: one "forward pass"

    def greedy(example, max_new=20):
        prompt = prompt_tokens(example, BYTES)
        tokens = list(prompt)
        while len(tokens) < len(prompt) + max_new and (len(tokens) == len(prompt) or tokens[-1] != E):
            tokens.append(bigram_next(tokens[-1]))
        return tokens[len(prompt) :]

    decoded = [greedy(ex) == BYTES.encode(ex.completion) + [E] for ex in examples]
    assert decoded == [True, False, False, True]
    assert greedy_exact_match(predictions, data.targets, data.loss_mask).tolist() == decoded
    padded = next(eval_batches(data, 6))  # the two padding rows never count as matches
    as_jax = greedy_exact_match(
        jnp.asarray(np.vectorize(bigram_next)(padded["input_ids"])), padded["targets"], padded["loss_mask"]
    )
    assert np.asarray(as_jax).tolist() == decoded + [False, False]


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
