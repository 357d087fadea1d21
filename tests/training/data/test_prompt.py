"""The prompt `jlora generate RUN_DIR` feeds: exactly the start of the run's training rows."""

import json

import numpy as np
import pytest

from jlora.training.data.config import DataConfig
from jlora.training.data.prompt import data_format, run_prompt
from jlora.training.data.rows import tokenize
from jlora.training.data.sources import read_examples
from jlora.training.data.tokenizer import ByteTokenizer


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        ({"question": "What is 2 plus 3?", "answer": "5"}, "qa"),
        ({"prompt": "Translate: chat ->", "completion": " cat"}, "prompt_completion"),
        ({"text": "Once upon a time"}, "text"),
        ({"context": "name : Aromi | Type : coffee shop", "completion": "Aromi is a coffee shop ."}, "data2text"),
        ("name : Aromi | Type : coffee shop||Aromi is a coffee shop .", "e2e"),  # a .txt file of MR||text lines
    ],
)
def test_generation_prompt_is_the_training_rows_prefix(record, fmt, tmp_path):
    data = tmp_path / ("train.txt" if fmt == "e2e" else "train.jsonl")
    data.write_text((record if fmt == "e2e" else json.dumps(record)) + "\n")
    assert data_format(DataConfig(train=str(data))) == fmt
    tokenizer = ByteTokenizer()
    row = tokenize(read_examples(str(data)), tokenizer, seq_len=64)
    first_loss = int(np.argmax(row.loss_mask[0]))  # the position whose target is the completion's first token
    asked, shown = {
        "qa": ("What is 2 plus 3?", "Question: What is 2 plus 3?\nAnswer:"),
        "prompt_completion": ("Translate: chat ->", "Translate: chat ->"),
        "text": ("", ""),
        "data2text": ("name : Aromi | Type : coffee shop", "name : Aromi | Type : coffee shop<|endoftext|>"),
        "e2e": ("name : Aromi | Type : coffee shop", "name : Aromi | Type : coffee shop<|endoftext|>"),
    }[fmt]
    text, ids = run_prompt(asked, fmt, tokenizer)
    assert ids == row.input_ids[0, : first_loss + 1].tolist() and text == shown
    assert run_prompt(shown, fmt, tokenizer) == (text, ids)  # a prompt already in the rows' form goes as written


def test_data_format_without_reading_a_dataset(tmp_path):
    assert data_format(DataConfig(train="bundled")) == "qa"
    assert data_format(DataConfig(train="bundled", format="text")) == "text"  # the config's own word wins
    assert data_format(DataConfig(train="some-org/some-dataset")) is None  # a `datasets` name: not loaded
    assert data_format(DataConfig(train=str(tmp_path / "moved.jsonl"))) is None
