"""Data-to-text records (E2E NLG, WebNLG, DART) in the LoRA paper's form, and a test file's references per MR.

microsoft/LoRA's ``examples/NLG`` (the paper's GPT-2 experiment) turns every data set into
``{"context", "completion"}`` records (``format_converting_{e2e,webnlg,dart}.py``) and encodes each
as one row, the loss on the completion only (``gpt2_encode.py --add_bos --add_eos``, GPT-2's
end-of-text 50256 as both "bos" and "eos")::

    enc(context) + [50256] + enc(" " + completion) + [50256]

`TEMPLATE` makes the `Example` whose jlora row (`jlora.training.data.rows`: end-of-text, prompt,
completion, end-of-text) holds those tokens after jlora's opening end-of-text ``e``::

    prompt      context + "<|endoftext|>"       (GPT-2's tokenizer reads this text as its id 50256)
    completion  " " + completion

    e  name : The Vaults | Type : pub ...  e   The Vaults pub ...  e
       └─ context: no loss ──────────┘  │  └─ completion: loss ┘  └ loss too: the model learns to stop
                                        └ the separator (the reference's "bos"), no loss

The byte tokenizer (``tokenizer: bytes``) has no such special token: it reads "<|endoftext|>" as its
13 bytes, the same in training and generation, so a byte run still learns where a text begins.

The files, each read into those records (`sources.read_examples` picks the reader)::

    name : The Vaults | Type : pub||The Vaults ...     "e2e", a .txt file: context left of "||", text right
    {"context": c, "completion": t}                     "data2text" (JSON Lines; the keys say so): the records
    {"entries": [{"1": {...}}, ...]}                    "webnlg": an entry's "good" lexicalisations, context
                                                        "subject : property : object | ..." (modifiedtripleset)
    [{"tripleset": [[s, p, o], ...], "annotations"}]    "dart": each annotation; the property lower-cased

As the reference does, the E2E line is stripped and split at "||" and each side kept verbatim.
A test set has several references per MR (E2E's has 630 MRs, about 7 each): `group_references`
collects them by context in first-seen order, as ``gpt2_decode.py`` does, each cut by `clean_text`,
the cleaning it also gives the decoded outputs. For WebNLG and DART the paper scores with another
script (GenerationEval: BLEU, METEOR, TER, on lower-cased, re-tokenized text, seen and unseen
categories apart through the records' "cate"), not with `jlora.research.nlg_metrics`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping

from jlora.errors import DataError, describe

SEPARATOR = "||"  # between an E2E line's MR and its text
END_OF_TEXT = "<|endoftext|>"
TEMPLATE = ("{context}" + END_OF_TEXT, " {completion}")  # (prompt, completion), like sources.QA_TEMPLATE
FILE_FORMATS = ("e2e", "webnlg", "dart")  # whole files `file_records` reads into records
# WebNLG 2017's categories seen in training (format_converting_webnlg.py): a record's "cate" is whether it is one
WEBNLG_SEEN = (
    "Airport",
    "Astronaut",
    "Building",
    "City",
    "ComicsCharacter",
    "Food",
    "Monument",
    "SportsTeam",
    "University",
    "WrittenWork",
)


def mr_records(raw: bytes, name: str) -> Iterator[tuple[str, dict]]:
    """E2E's ``MR||text`` lines -> (location, {"context", "completion"}); a bad line is a DataError naming it.

    >>> [r for _, r in mr_records(b"name : Aromi | eatType : coffee shop||Aromi is a coffee shop .\\n", "e2e.txt")]
    [{'context': 'name : Aromi | eatType : coffee shop', 'completion': 'Aromi is a coffee shop .'}]
    """
    lines = raw.split(b"\n")
    if lines[-1] == b"":  # the newline that ends the last line opens no new one
        lines.pop()
    for n, line in enumerate(lines, 1):
        where = f"{name}, line {n}"
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise DataError(f"{where}: not UTF-8 text") from None
        if not text:
            raise DataError(f"{where}: empty line")
        parts = text.split(SEPARATOR)
        if len(parts) != 2:
            raise DataError(f"{where}: expected one {SEPARATOR!r} between the MR and its text, found {len(parts) - 1}")
        yield where, {"context": parts[0], "completion": parts[1]}


def triples_context(triples: Iterable[tuple[str, str, str]]) -> str:
    """The reference code's context of (subject, property, object) triples.

    >>> triples_context([("Aarhus", "leaderName", "Jacob_Bundsgaard"), ("Aarhus", "country", "Denmark")])
    'Aarhus : leaderName : Jacob_Bundsgaard | Aarhus : country : Denmark'
    """
    return " | ".join(f"{s} : {p} : {o}" for s, p, o in triples)


def webnlg_records(data: object, name: str) -> Iterator[tuple[str, dict]]:
    """WebNLG 2017's JSON -> (location, {"context", "completion", "cate"}) for every "good" lexicalisation."""
    entries = data.get("entries") if isinstance(data, Mapping) else None
    if not isinstance(entries, list):
        raise DataError(f'{name}: expected a WebNLG object {{"entries": [...]}}')
    for i, entry in enumerate(entries, 1):
        where = f"{name}, entry {i}"
        try:
            item = entry[str(i)]  # entry i is {"i": {...}}
            context = triples_context((t["subject"], t["property"], t["object"]) for t in item["modifiedtripleset"])
            cate = item["category"] in WEBNLG_SEEN
            texts = [lex["lex"] for lex in item["lexicalisations"] if lex["comment"] == "good"]
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{where}: not a WebNLG entry ({describe(e)})") from None
        for text in texts:
            yield where, {"context": context, "completion": text, "cate": cate}


def dart_records(data: object, name: str) -> Iterator[tuple[str, dict]]:
    """DART's JSON -> (location, {"context", "completion"}) for every annotation (properties lower-cased)."""
    if not isinstance(data, list):
        raise DataError(f'{name}: expected a DART list [{{"tripleset": ..., "annotations": ...}}, ...]')
    for i, example in enumerate(data, 1):
        where = f"{name}, entry {i}"
        try:
            context = triples_context((s, p.lower(), o) for s, p, o in example["tripleset"])
            texts = [annotation["text"] for annotation in example["annotations"]]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(f"{where}: not a DART entry ({describe(e)})") from None
        for text in texts:
            yield where, {"context": context, "completion": text}


def file_records(raw: bytes, name: str, fmt: str) -> Iterator[tuple[str, dict]]:
    """The records of a whole data-to-text file in format "e2e", "webnlg" or "dart"."""
    if fmt == "e2e":
        return mr_records(raw, name)
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise DataError(f"{name}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{name}: invalid JSON ({e.msg}, line {e.lineno}, column {e.colno})") from None
    return webnlg_records(data, name) if fmt == "webnlg" else dart_records(data, name)


def clean_text(text: str) -> str:
    """A reference or a decoded output as gpt2_decode.py scores it: up to end-of-text, then a blank line; stripped.

    >>> clean_text(" Aromi is a coffee shop.\\n\\nname : Other<|endoftext|>")
    'Aromi is a coffee shop.'
    """
    return text.split(END_OF_TEXT)[0].split("\n\n")[0].strip()


def group_references(records: Iterable[Mapping]) -> tuple[list[str], list[list[str]]]:
    """(contexts, references): each distinct context once, in first-seen order, with the completions of its rows.

    Rows of one MR need not be adjacent (gpt2_decode.py keys a dict by the context).

    >>> group_references([{"context": "A", "completion": "a1"}, {"context": "B", "completion": "b"},
    ...                   {"context": "A", "completion": " a2 "}])
    (['A', 'B'], [['a1', 'a2'], ['b']])
    """
    grouped: dict[str, list[str]] = {}
    for record in records:
        grouped.setdefault(record["context"], []).append(clean_text(record["completion"]))
    return list(grouped), list(grouped.values())
