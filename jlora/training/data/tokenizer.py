"""Tokenizers behind one small protocol: ``encode``, ``decode``, ``eos_token_id``, ``vocab_size``.

Two kinds, chosen by `load_tokenizer`'s argument:

- ``"bytes"``: `ByteTokenizer`, fully offline, 257 ids (the 256 UTF-8 byte values and the
  end-of-text id 256); what the embedded default run trains a tiny model with.
- anything else: a GPT-2 BPE tokenizer (transformers' ``GPT2TokenizerFast``) from a checkpoint
  directory or a Hub id, wrapped as `HFTokenizer`.

Exports need the byte tokenizer in Hugging Face form: ``ByteTokenizer().hf`` is a
``GPT2TokenizerFast`` with GPT-2's byte-level alphabet, byte b's symbol at id b, end-of-text at
256 and no merges, so it encodes and decodes exactly as `ByteTokenizer` does.

>>> tok = load_tokenizer("bytes")
>>> tok.encode("hé")
[104, 195, 169]
>>> tok.decode([104, 195, 169, tok.eos_token_id])
'hé'
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Protocol

from jlora.errors import CheckpointError, TokenizerError, describe
from jlora.exchange.hf_checkpoint import TOKENIZER_FILES, hub_folder, is_hub_id


class Tokenizer(Protocol):
    eos_token_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, and 256 as end-of-text."""

    eos_token_id: int = 256
    vocab_size: int = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        """Bytes back to text; ids >= 256 (end-of-text) are skipped, broken UTF-8 becomes U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    @property
    def hf(self) -> Any:
        """The same tokenizer as a transformers ``GPT2TokenizerFast`` (what exports save beside a model).

        GPT-2's byte-level pre-tokenizer turns each byte into one symbol, and the vocabulary
        gives byte b's symbol id b, so with no merges every byte is its own token; end-of-text is
        256. ``split_special_tokens`` makes the text "<|endoftext|>" bytes, as it is here.
        """
        from transformers import GPT2TokenizerFast

        vocab = {symbol: byte for byte, symbol in byte_symbols().items()}
        vocab["<|endoftext|>"] = self.eos_token_id
        return GPT2TokenizerFast(vocab=vocab, merges=[], split_special_tokens=True)


def byte_symbols() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte -> the printable character that stands for it.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, ...) take
    the code points from 256 on, in byte order (GPT-2's ``bytes_to_unicode``).

    >>> symbols = byte_symbols()
    >>> symbols[ord("a")], symbols[ord(" ")], symbols[ord("\\n")], len(set(symbols.values()))
    ('a', 'Ġ', 'Ċ', 256)
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


@dataclasses.dataclass(frozen=True)
class HFTokenizer:
    """A transformers GPT-2 tokenizer seen through the protocol (no special tokens added on encode)."""

    hf: Any  # transformers.GPT2TokenizerFast

    @property
    def eos_token_id(self) -> int:
        return self.hf.eos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.hf)  # unlike hf.vocab_size, this counts added tokens

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)


def has_tokenizer_files(directory: Path) -> bool:
    """Whether `directory` holds a GPT-2 tokenizer (tokenizer.json, or vocab.json and merges.txt)."""
    return (directory / "tokenizer.json").exists() or (
        (directory / "vocab.json").exists() and (directory / "merges.txt").exists()
    )


def load_tokenizer(source: str) -> ByteTokenizer | HFTokenizer:
    """``"bytes"``, a directory with a GPT-2 tokenizer, or a Hub id (e.g. ``"gpt2"``).

    A Hub id is fetched by `jlora.exchange.hf_checkpoint.hub_folder` (the local cache when the
    Hub cannot be reached: one probe, no retries). Raises TokenizerError with a one-line reason
    when nothing usable can be loaded.
    """
    if source == "bytes":
        return ByteTokenizer()
    path = Path(source).expanduser()
    if not path.is_dir():
        if not is_hub_id(source):
            raise TokenizerError(
                f"no tokenizer directory at {source!r}; use 'bytes', a directory or a Hub id such as 'gpt2'"
            )
        try:
            path = hub_folder(source, TOKENIZER_FILES, what="tokenizer files")
        except CheckpointError as e:
            raise TokenizerError(str(e)) from None
    if not has_tokenizer_files(path):
        raise TokenizerError(f"no tokenizer in {path} (expected tokenizer.json, or vocab.json and merges.txt)")
    from transformers import GPT2TokenizerFast

    try:
        hf = GPT2TokenizerFast.from_pretrained(str(path))
    except Exception as e:  # corrupt files: one line for the caller
        raise TokenizerError(f"could not load a GPT-2 tokenizer from {source!r} ({describe(e)})") from e
    if len(hf) < 2 or hf.eos_token_id is None:
        raise TokenizerError(
            f"could not load a GPT-2 tokenizer from {source!r} (empty vocabulary or no end-of-text token)"
        )
    return HFTokenizer(hf)
