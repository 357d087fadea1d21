"""Prompts in the form a run trained on: what `jlora generate RUN_DIR` feeds its model.

A run learns to continue rows that open with end-of-text and its data's prompt
(`jlora.training.data`); for question-answer data the prompt is ``QA_TEMPLATE``'s. So a question
is asked of such a run as its training rows ask it::

    "What is 23 plus 19?"  ──run_prompt(..., "qa")──>  e "Question: What is 23 plus 19?\\nAnswer:"  -> " 42"

A data-to-text run's context is followed by the end-of-text its rows put between the data and the
text (`jlora.training.data.data2text`)::

    "name : Aromi | eatType : coffee shop"  ──run_prompt(..., "data2text")──>  e "name : ... shop<|endoftext|>"

Prompt-completion and plain-text runs read the text as written, after the same end-of-text.

A chat model's run may write its question-answer rows in the tokenizer's chat template instead
(``data.template: chat``, `chat_example`): the question as the user's turn, the answer as the
assistant's, closed by the tokenizer's end-of-text (SmolLM2's ``<|im_end|>``); `run_prompt` then asks
its questions the same way.
The format is the run's ``data.format``, or (when "auto") that of its training file's first
record; a `datasets` source cannot be told without loading it, and its prompts go as written.
A QA prompt already written in the template (`Question: ...\\nAnswer:`, as an export is asked) goes as
written, and so does a data-to-text prompt already ending in end-of-text.

>>> from jlora.training.data.tokenizer import ByteTokenizer
>>> text, ids = run_prompt("What is 2 plus 3?", "qa", ByteTokenizer())
>>> text, ids[:3]
('Question: What is 2 plus 3?\\nAnswer:', [256, 81, 117])
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from jlora.errors import DataError
from jlora.training.data import data2text
from jlora.training.data.config import DataConfig
from jlora.training.data.rows import prompt_tokens
from jlora.training.data.sources import (
    QA_TEMPLATE,
    Example,
    bundled_source,
    data2text_example,
    detect_format,
    qa_example,
)
from jlora.training.data.tokenizer import Tokenizer

DATA2TEXT = ("data2text", *data2text.FILE_FORMATS)  # the formats whose prompt is a context and end-of-text


def data_format(data: DataConfig) -> str | None:
    """The record format of a run's training data ("qa", "prompt_completion", "text", "data2text", "e2e"...),
    None if unknown.

    >>> data_format(DataConfig(train="bundled")), data_format(DataConfig(train="bundled:facts"))
    ('qa', 'qa')
    """
    if data.format != "auto":
        return data.format
    file = bundled_source(data.train, "train")
    if file is None:
        file = Path(data.train).expanduser()
        if not file.is_file():  # a `datasets` name, or a file no longer where the run read it
            return None
        if file.suffix == ".txt":  # what sources.read_examples reads as E2E's MR||text lines
            return "e2e"
    with file.open("rb") as f:
        first = f.readline()
    try:
        record = json.loads(first)
    except ValueError:
        return None
    return detect_format(record) if isinstance(record, Mapping) else None


def in_template(text: str) -> bool:
    """Whether `text` is already a prompt in QA_TEMPLATE's form (``Question: ...\\nAnswer:``).

    >>> in_template("Question: Is 736 even or odd?\\nAnswer:"), in_template("Is 736 even or odd?")
    (True, False)
    """
    before, _, after = QA_TEMPLATE[0].partition("{question}")
    return text.startswith(before) and text.endswith(after) and len(text) > len(before) + len(after)


TEMPLATES = ("qa", "chat")  # data.template: how question-answer rows are written


def chat_example(example: Example, tokenizer: Tokenizer) -> Example:
    """A question-answer example in the tokenizer's chat template (`HFTokenizer.chat_prompt`); the answer
    is the assistant's turn. TokenizerError without a template; DataError for a row that is not a QA pair."""
    if example.question is None:
        raise DataError("data.template: chat writes question-answer rows; this data has other records")
    return Example(tokenizer.chat_prompt(example.question), example.answer, example.question, example.answer)


def run_prompt(text: str, fmt: str | None, tokenizer: Tokenizer, template: str = "qa") -> tuple[str, list[int]]:
    """(the prompt as the run's rows show it, its token ids after the row's opening token).

    A QA run's question goes through its template (QA_TEMPLATE, or the chat template with
    ``template="chat"``); a prompt already in QA_TEMPLATE's form goes as written (wrapping it again
    would ask ``Question: Question: ...``).
    """
    if fmt == "qa" and template == "chat":
        example = Example(tokenizer.chat_prompt(text), "")
    elif fmt == "qa" and not in_template(text):
        example = qa_example(text, "")
    elif fmt in DATA2TEXT and not text.endswith(data2text.END_OF_TEXT):
        example = data2text_example(text, "")
    else:
        example = Example(text, "")
    return example.prompt, prompt_tokens(example, tokenizer)
