"""The tokenizer protocol: bytes, and GPT-2 BPE tokenizers built offline from a hand-made vocabulary."""

from __future__ import annotations

import json

import pytest
from tokenizers.pre_tokenizers import ByteLevel

from jlora.training.data.tokenizer import ByteTokenizer, HFTokenizer, TokenizerError, load_tokenizer

EOT = "<|endoftext|>"
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]


def tiny_vocab() -> dict[str, int]:
    """GPT-2's byte-level alphabet, three merges that build "Ġthe" (' the'), then end-of-text."""
    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    vocab[EOT] = len(vocab)
    return vocab


def test_bytes_round_trip_and_special_ids():
    tok = load_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer) and (tok.vocab_size, tok.eos_token_id) == (257, 256)
    text = "Naïve café: 3 + 4 = 7 ✓"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.decode(tok.encode(text) + [256]) == text  # end-of-text is not text
    assert tok.decode([104, 0xC3]) == "h\ufffd"  # a cut multi-byte character becomes U+FFFD


@pytest.mark.parametrize("layout", ["vocab_merges", "tokenizer_json"])
def test_gpt2_tokenizer_from_directory(tmp_path, layout):
    vocab = tiny_vocab()
    if layout == "vocab_merges":  # what GPT-2 repositories on the Hub ship
        (tmp_path / "vocab.json").write_text(json.dumps(vocab))
        (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    else:
        from transformers import GPT2TokenizerFast

        GPT2TokenizerFast(vocab=vocab, merges=MERGES).save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, HFTokenizer)
    assert (tok.vocab_size, tok.eos_token_id) == (len(vocab), vocab[EOT])
    # by hand: " the" is one merged token; " th" merges only "Ġt"; "é" is two byte symbols
    expected = [vocab["Ġthe"], vocab["Ġt"], vocab["h"], vocab["Ã"], vocab["©"]]
    assert tok.encode(" the thé") == expected
    assert tok.decode(expected + [tok.eos_token_id]) == " the thé"
    text = "Question: What is 12 plus 30?\nAnswer: 42"
    assert tok.decode(tok.encode(text)) == text


def test_unloadable_tokenizers_are_one_line_errors(tmp_path, tiny_hf):
    model_dir, _ = tiny_hf  # a checkpoint saved without tokenizer files
    for source, names in [(str(model_dir), str(model_dir)), (str(tmp_path / "nope"), "nope"), ("./x/y", "./x/y")]:
        with pytest.raises(TokenizerError) as e:
            load_tokenizer(source)
        assert names in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="could not load a GPT-2 tokenizer") as e:
        load_tokenizer(str(tmp_path))
    assert "\n" not in str(e.value)


def test_the_byte_tokenizers_hugging_face_form_encodes_and_decodes_the_same(tmp_path):
    """What exports save for a byte-tokenizer run: saved and reloaded, it is jlora's ByteTokenizer id for id."""
    from transformers import AutoTokenizer

    ours = ByteTokenizer()
    ours.hf.save_pretrained(tmp_path)
    saved = AutoTokenizer.from_pretrained(tmp_path)  # as a transformers user loads an export
    assert (len(saved), saved.eos_token_id) == (ours.vocab_size, ours.eos_token_id)
    assert sorted(saved.get_vocab().values()) == list(range(257))
    texts = ["Question: What is 12 plus 30?\nAnswer: 42", "  two  spaces\tand a tab", "Naïve café ✓ 😀"]
    texts.append("<|endoftext|>")  # text, not the special token
    for text in texts:
        assert saved.encode(text) == ours.encode(text) == list(text.encode("utf-8"))
    every_byte = list(range(256))
    assert saved.decode(every_byte) == ours.decode(every_byte)
    broken = [0xE2, 0x9C, 65, 0xFF, 0x80, 0xF0, 0x9F, 0x98, 256, 104]  # cut and invalid UTF-8, end-of-text
    assert saved.decode(broken, skip_special_tokens=True) == ours.decode(broken) == "\ufffdA\ufffd\ufffd\ufffdh"
    wrapped = load_tokenizer(str(tmp_path))  # and jlora reads the export back through its protocol
    assert isinstance(wrapped, HFTokenizer) and wrapped.encode(texts[2]) == ours.encode(texts[2])
