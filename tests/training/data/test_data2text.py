"""Data-to-text files (E2E lines, their JSONL form, WebNLG, DART) read as the reference code reads them; references."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers.pre_tokenizers import ByteLevel

from jlora.errors import DataError
from jlora.training.data.data2text import END_OF_TEXT, clean_text
from jlora.training.data.rows import tokenize
from jlora.training.data.sources import Example, read_examples, read_references
from jlora.training.data.tokenizer import HFTokenizer

AROMI = "name : Aromi | Type : coffee shop | food : Chinese | area : riverside"
VAULTS = "name : The Vaults | Type : pub | price : more than £ 30 | near : Café Adriatic"
BLUE = "name : The Cambridge Blue | Type : restaurant | food : English"
# E2E-shaped MR||text lines: Aromi twice, then The Vaults, Aromi again (not adjacent), The Cambridge Blue
TEST_LINES = [
    f"{AROMI}||Aromi is a coffee shop serving Chinese food by the riverside .",
    f"{AROMI}||By the riverside , Aromi is a Chinese coffee shop .",
    f"{VAULTS}||The Vaults pub near Café Adriatic has prices over £ 30 .",
    f"{AROMI}||Aromi serves Chinese food .",
    f"{BLUE}||The Cambridge Blue is an English restaurant .",
]


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_e2e_lines_are_the_reference_codes_prompt_and_completion(tmp_path):
    examples = read_examples(str(write(tmp_path / "train.txt", TEST_LINES[:3])))
    assert examples == [
        Example(f"{AROMI}<|endoftext|>", " Aromi is a coffee shop serving Chinese food by the riverside ."),
        Example(f"{AROMI}<|endoftext|>", " By the riverside , Aromi is a Chinese coffee shop ."),
        Example(f"{VAULTS}<|endoftext|>", " The Vaults pub near Café Adriatic has prices over £ 30 ."),
    ]
    # the line is stripped (a CRLF file too), each side of "||" kept verbatim, as format_converting_e2e.py does
    crlf = tmp_path / "crlf.data"
    crlf.write_bytes(b"  name : A | food : B ||A serves B .\r\n")
    assert read_examples(str(crlf), fmt="e2e") == [Example("name : A | food : B <|endoftext|>", " A serves B .")]


def test_the_jsonl_form_reads_as_the_lines(tmp_path):
    """format_converting_e2e.py's output (and WebNLG's, with "cate"): the keys say which format it is."""
    records = []
    for line in TEST_LINES:
        context, completion = line.split("||")
        records.append(json.dumps({"context": context, "completion": completion, "cate": True}))
    jsonl = write(tmp_path / "test_formatted.jsonl", records)
    assert read_examples(str(jsonl)) == read_examples(str(write(tmp_path / "test.txt", TEST_LINES)))
    assert read_references(jsonl) == read_references(tmp_path / "test.txt")


def test_a_row_holds_the_reference_codes_tokens(tmp_path):
    """gpt2_encode.py: enc(context) + [eos] + enc(" " + completion) + [eos]; jlora adds its opening eos."""
    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    merges = [("Ġ", "A"), ("Ġ", "s"), ("a", "m")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab[END_OF_TEXT] = eos = len(vocab)
    from transformers import GPT2TokenizerFast

    tok = HFTokenizer(GPT2TokenizerFast(vocab=vocab, merges=merges))
    context, completion = "name : Aromi", "Aromi serves Chinese food ."
    [example] = read_examples(str(write(tmp_path / "one.txt", [f"{context}||{completion}"])))
    reference = tok.encode(context) + [eos] + tok.encode(" " + completion) + [eos]
    assert vocab["ĠA"] in reference and vocab["am"] in reference  # merges on both sides of the separator
    data = tokenize([example], tok, seq_len=64)
    n = len(reference)  # T inputs: e + reference[:-1]; targets: reference
    assert data.input_ids[0, :n].tolist() == [eos] + reference[:-1]
    assert data.targets[0, :n].tolist() == reference
    n_context = len(tok.encode(context)) + 1  # the context and the separator: targets with no loss
    assert data.loss_mask[0].tolist() == [0.0] * n_context + [1.0] * (n - n_context) + [0.0] * (64 - n)


def test_references_are_grouped_by_context_in_first_seen_order(tmp_path):
    contexts, references = read_references(write(tmp_path / "test.txt", TEST_LINES))
    assert contexts == [AROMI, VAULTS, BLUE]
    assert references == [
        [
            "Aromi is a coffee shop serving Chinese food by the riverside .",
            "By the riverside , Aromi is a Chinese coffee shop .",
            "Aromi serves Chinese food .",  # line 4: the same MR, not next to the others
        ],
        ["The Vaults pub near Café Adriatic has prices over £ 30 ."],
        ["The Cambridge Blue is an English restaurant ."],
    ]


def test_references_are_cleaned_as_gpt2_decode_cleans_them(tmp_path):
    rows = [
        {"context": "A", "completion": " a1 <|endoftext|> junk"},
        {"context": "A", "completion": "a2\n\nnext"},
        {"context": "B", "completion": "b"},
    ]
    path = write(tmp_path / "test.jsonl", [json.dumps(r) for r in rows])
    assert read_references(path) == (["A", "B"], [["a1", "a2"], ["b"]])
    assert clean_text(" The Vaults is a pub .\n\nname : The Vaults<|endoftext|>") == "The Vaults is a pub ."


BAD_LINES = [
    (f"{AROMI} Aromi is a coffee shop .", "expected one '||' between the MR and its text, found 0"),
    (f"{AROMI}||Aromi||is a coffee shop .", "expected one '||' between the MR and its text, found 2"),
    ("", "empty line"),
    ("   ", "empty line"),
    ("||Aromi is a coffee shop .", "'context' is empty"),
    (f"{AROMI}||  ", "'completion' is empty"),
]


@pytest.mark.parametrize("line, reason", BAD_LINES)
@pytest.mark.parametrize("read", [read_examples, read_references])
def test_a_bad_line_names_file_and_line(tmp_path, read, line, reason):
    path = write(tmp_path / "train.txt", [*TEST_LINES[:2], line, TEST_LINES[2]])
    with pytest.raises(DataError) as e:
        read(str(path))
    message = str(e.value)
    assert f"{path}, line 3: " in message and reason in message and "\n" not in message


def test_bad_files(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(TEST_LINES[0].encode() + b"\n" + "name : Café||x".encode("latin-1") + b"\n")
    with pytest.raises(DataError, match=r"latin1\.txt, line 2: not UTF-8 text"):
        read_examples(str(latin1))
    with pytest.raises(DataError, match="no data file"):
        read_examples(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match=r"no examples"):
        read_references(write(tmp_path / "empty.txt", []))
    qa = write(tmp_path / "qa.jsonl", ['{"question": "q", "answer": "a"}'])
    with pytest.raises(DataError, match=r"qa\.jsonl, line 1: references need data-to-text records"):
        read_references(qa)
    with pytest.raises(DataError, match=r"unknown data format 'e2e_nlg'; expected .* data2text, e2e, webnlg, dart"):
        read_examples(str(qa), fmt="e2e_nlg")


WEBNLG = {
    "entries": [
        {
            "1": {
                "category": "Airport",
                "lexicalisations": [
                    {"comment": "good", "lex": "Aarhus Airport serves Aarhus, Denmark."},
                    {"comment": "bad", "lex": "Aarhus airport aarhus."},
                    {"comment": "good", "lex": "Aarhus, Denmark is served by Aarhus Airport."},
                ],
                "modifiedtripleset": [
                    {"subject": "Aarhus_Airport", "property": "cityServed", "object": '"Aarhus, Denmark"'},
                    {"subject": "Aarhus", "property": "leaderName", "object": "Jacob_Bundsgaard"},
                ],
            }
        },
        {
            "2": {
                "category": "Artist",
                "lexicalisations": [{"comment": "good", "lex": "Alan Frew is a musician."}],
                "modifiedtripleset": [{"subject": "Alan_Frew", "property": "occupation", "object": "Musician"}],
            }
        },
    ]
}
DART = [
    {
        "tripleset": [["Mars Hill College", "JOINED", "1973"], ["Mars Hill College", "LOCATION", "Mars Hill, NC"]],
        "annotations": [
            {"source": "WikiSQL_decl_sents", "text": "Mars Hill College, in Mars Hill, NC, joined in 1973."},
            {"source": "WikiSQL_decl_sents", "text": "Mars Hill College joined in 1973."},
        ],
    }
]


def test_webnlg_and_dart_map_to_the_same_records(tmp_path):
    webnlg = tmp_path / "dev.json"
    webnlg.write_text(json.dumps(WEBNLG))
    aarhus = 'Aarhus_Airport : cityServed : "Aarhus, Denmark" | Aarhus : leaderName : Jacob_Bundsgaard'
    assert read_examples(str(webnlg), fmt="webnlg") == [  # only the "good" lexicalisations
        Example(aarhus + END_OF_TEXT, " Aarhus Airport serves Aarhus, Denmark."),
        Example(aarhus + END_OF_TEXT, " Aarhus, Denmark is served by Aarhus Airport."),
        Example("Alan_Frew : occupation : Musician" + END_OF_TEXT, " Alan Frew is a musician."),
    ]
    assert read_references(webnlg, fmt="webnlg")[1] == [
        ["Aarhus Airport serves Aarhus, Denmark.", "Aarhus, Denmark is served by Aarhus Airport."],
        ["Alan Frew is a musician."],
    ]
    dart = tmp_path / "dart-v1.1.1-full-dev.json"
    dart.write_text(json.dumps(DART))
    context = "Mars Hill College : joined : 1973 | Mars Hill College : location : Mars Hill, NC"  # lower-cased
    assert read_references(dart, fmt="dart") == (
        [context],
        [["Mars Hill College, in Mars Hill, NC, joined in 1973.", "Mars Hill College joined in 1973."]],
    )


def test_bad_webnlg_and_dart_files_name_the_entry(tmp_path):
    broken = json.loads(json.dumps(WEBNLG))
    del broken["entries"][1]["2"]["modifiedtripleset"]
    path = tmp_path / "webnlg.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(DataError, match=r"webnlg\.json, entry 2: not a WebNLG entry \(KeyError"):
        read_examples(str(path), fmt="webnlg")
    path.write_text(json.dumps(DART))  # a DART file read as WebNLG
    with pytest.raises(DataError, match=r"expected a WebNLG object"):
        read_examples(str(path), fmt="webnlg")
    path.write_text(json.dumps([{"tripleset": [["a", "b"]], "annotations": []}]))
    with pytest.raises(DataError, match=r"webnlg\.json, entry 1: not a DART entry \(ValueError"):
        read_examples(str(path), fmt="dart")
    path.write_text('{"entries": [')
    with pytest.raises(DataError, match=r"webnlg\.json: invalid JSON \(.*line 1"):
        read_examples(str(path), fmt="webnlg")
