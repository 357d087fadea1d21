"""Fine-tuning data, first stage: records -> `Example`s (prompt, completion).

    examples = read_examples("qa.jsonl")             # or "bundled", "bundled:facts", or a `datasets` name
    (then jlora.training.data.rows: tokenize -> batch_at; jlora.training.data.batching: shape_batch)

The package bundles two question-answer tasks, named as a source (the split comes from the caller,
``data.train`` reading "train" and ``data.validation`` "validation", unless the name pins one)::

    "bundled"                 the rule-following QA task (scripts/make_qa_data.py); its "generic"
                              split is the held-out text for forgetting
    "bundled:facts"           real facts from Debian's bsdgames quiz files (scripts/make_facts_data.py);
                              "validation" holds facts never trained on (generalisation)
    "bundled:facts:memorise"  a pinned split: training facts asked again (memorisation)

Four record formats, detected from the first record's keys (or named with ``fmt``)::

    {"question": q, "answer": a}      prompt "Question: {q}\\nAnswer:", completion " {a}"  (QA_TEMPLATE)
    {"prompt": p, "completion": c}    prompt p, completion c
    {"text": t}                       prompt "", completion t
    {"context": c, "completion": t}   prompt c + "<|endoftext|>", completion " " + t  (data2text.TEMPLATE)

and whole data-to-text files read into the last (`jlora.training.data.data2text`): ``fmt="e2e"``
(E2E's ``MR||text`` lines; any ``.txt`` file when "auto"), "webnlg" and "dart" (their JSON).
`read_references` groups a data-to-text test file's references by MR, for scoring.

Other keys are read past (a facts row's "source" and "answers"). A bad record is a one-line
`DataError` naming the file and line (or the dataset and row).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
from collections.abc import Iterator, Mapping
from importlib.resources.abc import Traversable
from pathlib import Path

from jlora.errors import DataError, describe
from jlora.training.data import data2text

QA_TEMPLATE = ("Question: {question}\nAnswer:", " {answer}")  # (prompt, completion): the one place it lives
FORMATS = {
    "qa": ("question", "answer"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "data2text": ("context", "completion"),
}
BUNDLED = {  # the QA task, "bundled": split -> file in jlora/data
    "train": "qa_train.jsonl",
    "validation": "qa_val.jsonl",
    "val": "qa_val.jsonl",
    "generic": "generic_text.jsonl",
}
FACTS = {  # the facts task, "bundled:facts"
    "train": "facts_train.jsonl",
    "validation": "facts_val.jsonl",
    "val": "facts_val.jsonl",
    "memorise": "facts_memorise_val.jsonl",
}
TASKS = {"qa": BUNDLED, "facts": FACTS}


@dataclasses.dataclass(frozen=True)
class Example:
    """One training pair: the model reads `prompt` and learns to write `completion`; a question-answer
    pair keeps its `question` and `answer` too, so another template can write it (`jlora.training.data.prompt`)."""

    prompt: str
    completion: str
    question: str | None = dataclasses.field(default=None, repr=False, compare=False)
    answer: str | None = dataclasses.field(default=None, repr=False, compare=False)


def qa_example(question: str, answer: str) -> Example:
    """A question-answer pair through QA_TEMPLATE.

    >>> qa_example("What is 2 plus 3?", "5")
    Example(prompt='Question: What is 2 plus 3?\\nAnswer:', completion=' 5')
    """
    prompt, completion = QA_TEMPLATE
    return Example(prompt.format(question=question), completion.format(answer=answer), question, answer)


def data2text_example(context: str, completion: str) -> Example:
    """A data-to-text record through data2text.TEMPLATE: the reference code's row (context, end-of-text, " " + text).

    >>> data2text_example("name : Aromi | eatType : coffee shop", "Aromi is a coffee shop .")
    Example(prompt='name : Aromi | eatType : coffee shop<|endoftext|>', completion=' Aromi is a coffee shop .')
    """
    prompt, text = data2text.TEMPLATE
    return Example(prompt.format(context=context), text.format(completion=completion))


def detect_format(record: Mapping) -> str | None:
    """The format whose keys `record` has (QA first), or None."""
    return next((fmt for fmt, keys in FORMATS.items() if all(k in record for k in keys)), None)


def to_example(record: object, fmt: str) -> Example:
    """One parsed record -> an Example; raises DataError (without location) if it does not fit `fmt`."""
    if not isinstance(record, Mapping):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    keys = FORMATS[fmt]
    for key in keys:
        if key not in record:
            raise DataError(f"missing key {key!r} (a {fmt} record needs {', '.join(map(repr, keys))})")
        if not isinstance(record[key], str):
            raise DataError(f"{key!r} must be a string, got {type(record[key]).__name__}")
        if key != "prompt" and not record[key].strip():
            raise DataError(f"{key!r} is empty")
    if fmt == "qa":
        return qa_example(record["question"], record["answer"])
    if fmt == "prompt_completion":
        return Example(record["prompt"], record["completion"])
    if fmt == "data2text":
        return data2text_example(record["context"], record["completion"])
    return Example("", record["text"])


def _examples(records: Iterator[tuple[str, object]], fmt: str, name: str) -> list[Example]:
    """(location, record) pairs -> Examples, the format fixed by the first record when "auto"."""
    _check_format(fmt)
    examples = []
    for where, record in records:
        try:
            if fmt == "auto":
                fmt = detect_format(record) if isinstance(record, Mapping) else None
                if fmt is None:
                    keys = sorted(record) if isinstance(record, Mapping) else type(record).__name__
                    raise DataError(f"cannot tell the format from {keys}; expected keys {list(FORMATS.values())}")
            examples.append(to_example(record, fmt))
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
    if not examples:
        raise DataError(f"{name}: no examples")
    return examples


def _check_format(fmt: str) -> None:
    if fmt != "auto" and fmt not in FORMATS and fmt not in data2text.FILE_FORMATS:
        known = ", ".join([*FORMATS, *data2text.FILE_FORMATS])
        raise DataError(f"unknown data format {fmt!r}; expected 'auto' or one of {known}")


def _jsonl_records(raw: bytes, name: str) -> Iterator[tuple[str, object]]:
    lines = raw.split(b"\n")
    if lines[-1] == b"":  # the newline that ends the last line opens no new one
        lines.pop()
    for n, line in enumerate(lines, 1):
        where = f"{name}, line {n}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{where}: not UTF-8 text") from None
        if not text.strip():
            raise DataError(f"{where}: empty line")
        try:
            yield where, json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where}: invalid JSON ({e.msg}, column {e.colno}); expected one object per line"
            ) from None


def _file_records(path: Path, fmt: str) -> tuple[Iterator[tuple[str, object]], str]:
    """A local file's (location, record) pairs and the record format: a data-to-text file gives "data2text" records."""
    _check_format(fmt)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read data file {path} ({e.strerror or type(e).__name__})") from None
    if fmt in data2text.FILE_FORMATS or (fmt == "auto" and path.suffix == ".txt"):
        return data2text.file_records(raw, str(path), "e2e" if fmt == "auto" else fmt), "data2text"
    return _jsonl_records(raw, str(path)), fmt


def read_file(path: str | Path, fmt: str = "auto") -> list[Example]:
    """A local JSON Lines file, or a data-to-text file ("e2e", "webnlg", "dart"), -> Examples.

    A bad line raises DataError naming the file and line (1-based; for WebNLG and DART the entry).
    """
    path = Path(path).expanduser()
    records, fmt = _file_records(path, fmt)
    return _examples(records, fmt, str(path))


def read_references(path: str | Path, fmt: str = "auto") -> tuple[list[str], list[list[str]]]:
    """A data-to-text test file -> (contexts, references): each MR once, in first-seen order, with its references.

    The file is any that `read_file` reads into data-to-text records; see data2text.group_references.
    """
    path = Path(path).expanduser()
    records, fmt = _file_records(path, fmt)
    checked = []
    for where, record in records:
        try:
            if fmt == "auto" and isinstance(record, Mapping) and detect_format(record) == "data2text":
                fmt = "data2text"
            if fmt != "data2text":
                named = "" if fmt == "auto" else f" (format {fmt!r})"
                raise DataError(f"references need data-to-text records {{'context': ..., 'completion': ...}}{named}")
            to_example(record, fmt)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        checked.append(record)
    if not checked:
        raise DataError(f"{path}: no examples")
    return data2text.group_references(checked)


def bundled_file(split: str = "train", task: str = "qa") -> Traversable:
    """The package's data.

    The QA task ("qa"): split "train" (1,000 pairs) or "validation" (200; alias "val"), or "generic":
    general text from outside the task, the held-out set that measures forgetting. The facts task
    ("facts"): "train" (806 pairs), "validation" (182 on facts not in "train"; alias "val") or
    "memorise" (182 of the "train" pairs).
    """
    if task not in TASKS:
        raise DataError(f"the bundled tasks are {', '.join(map(repr, TASKS))}, not {task!r}")
    if split not in TASKS[task]:
        if task == "facts":
            raise DataError(f"the bundled facts task has splits 'train', 'validation' and 'memorise', not {split!r}")
        raise DataError(
            f"the bundled data has splits 'train' and 'validation' (the QA task) and 'generic', not {split!r}"
        )
    return importlib.resources.files("jlora") / "data" / TASKS[task][split]


def bundled_source(source: str, split: str) -> Traversable | None:
    """The bundled file a source name means, or None if `source` is not ``bundled[:TASK[:SPLIT]]``.

    A split in the name is used in place of `split`.

    >>> [bundled_source(s, "validation").name for s in ("bundled", "bundled:facts", "bundled:facts:memorise")]
    ['qa_val.jsonl', 'facts_val.jsonl', 'facts_memorise_val.jsonl']
    >>> bundled_source("qa.jsonl", "train") is None
    True
    """
    name, *parts = source.split(":")
    if name != "bundled":
        return None
    if len(parts) > 2:
        raise DataError(f"a bundled source is 'bundled', 'bundled:TASK' or 'bundled:TASK:SPLIT', not {source!r}")
    return bundled_file(parts[1] if len(parts) == 2 else split, parts[0] if parts else "qa")


def read_examples(source: str, *, split: str = "train", fmt: str = "auto", **load_kwargs) -> list[Example]:
    """Examples from a local ``.jsonl`` file, ``"bundled"``, or a Hugging Face `datasets` dataset.

    Args:
      source: a file path (its content is the split: `split` is not used), ``"bundled"`` (jlora's
        QA task), ``"bundled:facts"`` (its facts task; ``"bundled:facts:memorise"`` pins a split),
        or a name for ``datasets.load_dataset`` (a Hub id, or a builder such as ``"json"`` with
        ``data_files=...`` in `load_kwargs`).
      split: which split of the bundled data or of the dataset.
      fmt: "auto" (from the first record's keys; a ``.txt`` file is "e2e"), "qa", "prompt_completion",
        "text", "data2text", or a data-to-text file's "e2e", "webnlg" or "dart".
      load_kwargs: passed to ``datasets.load_dataset`` (``data_files``, ``revision``, ``cache_dir``...).

    Raises DataError with a one-line message naming the file and line (or dataset and row).
    """
    file = bundled_source(source, split)
    if file is not None:
        return _examples(_jsonl_records(file.read_bytes(), f"bundled {file.name}"), fmt, str(file))
    path = Path(source).expanduser()
    if path.is_file():
        return read_file(path, fmt)
    if path.exists() or path.suffix in (".jsonl", ".json", ".txt") or source.startswith((".", "/", "~")):
        raise DataError(f"no data file {source!r}")
    return read_dataset(source, split=split, fmt=fmt, **load_kwargs)


def read_dataset(name: str, *, split: str = "train", fmt: str = "auto", **load_kwargs) -> list[Example]:
    """A split of a Hugging Face `datasets` dataset -> Examples (a bad row is named by its 1-based number)."""
    try:
        import datasets

        rows = datasets.load_dataset(name, split=split, **load_kwargs)
    except Exception as e:  # missing, offline, bad files: all end the same way for the caller
        raise DataError(f"could not load dataset {name!r} split {split!r} ({describe(e)})") from e
    where = f"dataset {name!r} split {split!r}"
    return _examples(((f"{where}, row {i}", row) for i, row in enumerate(rows, 1)), fmt, where)
