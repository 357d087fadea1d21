"""Tokenizers behind one small protocol: ``encode``, ``decode``, ``eos_token_id``, ``vocab_size``.

Two kinds, chosen by `load_tokenizer`'s argument:

- ``"bytes"``: `ByteTokenizer`, fully offline, 257 ids (the 256 UTF-8 byte values and the
  end-of-text id 256); what the embedded default run trains a tiny model with.
- anything else: a GPT-2 BPE tokenizer (transformers' ``GPT2TokenizerFast``) from a checkpoint
  directory or a Hub id, wrapped as `HFTokenizer`.

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

from jlora.errors import TokenizerError, describe


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


def _has_tokenizer_files(directory: Path) -> bool:
    return (directory / "tokenizer.json").exists() or (
        (directory / "vocab.json").exists() and (directory / "merges.txt").exists()
    )


def load_tokenizer(source: str) -> ByteTokenizer | HFTokenizer:
    """``"bytes"``, a directory with a GPT-2 tokenizer, or a Hub id (e.g. ``"gpt2"``).

    Raises TokenizerError with a one-line reason when nothing usable can be loaded.
    """
    if source == "bytes":
        return ByteTokenizer()
    path = Path(source).expanduser()
    if path.is_dir():
        if not _has_tokenizer_files(path):
            raise TokenizerError(f"no tokenizer in {path} (expected tokenizer.json, or vocab.json and merges.txt)")
    elif path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise TokenizerError(
            f"no tokenizer directory at {source!r}; use 'bytes', a directory or a Hub id such as 'gpt2'"
        )
    from transformers import GPT2TokenizerFast

    try:
        hf = GPT2TokenizerFast.from_pretrained(str(path) if path.is_dir() else source)
    except Exception as e:  # offline, unknown repo, corrupt files: all end the same way for the caller
        raise TokenizerError(f"could not load a GPT-2 tokenizer from {source!r} ({describe(e)})") from e
    # Offline, transformers 5 "loads" an unknown Hub id as an empty tokenizer instead of failing.
    if len(hf) < 2 or hf.eos_token_id is None:
        raise TokenizerError(
            f"could not load a GPT-2 tokenizer from {source!r} (empty vocabulary or no end-of-text token; "
            "offline? pass a local directory with tokenizer.json)"
        )
    return HFTokenizer(hf)
