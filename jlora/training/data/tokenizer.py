"""Tokenizers behind one small protocol: ``encode``, ``decode``, ``eos_token_id``, ``vocab_size``.

Three kinds, chosen by `load_tokenizer`'s argument:

- ``"bytes"``: `ByteTokenizer`, fully offline, 257 ids (the 256 UTF-8 byte values and the
  end-of-text id 256); what the embedded default run trains a tiny model with.
- a GGUF file, or ``"smollm2"``: the tokenizer the file carries (with its chat template).
- anything else: a transformers tokenizer from a checkpoint directory or a Hub id (GPT-2's
  ``GPT2TokenizerFast`` where the folder is a GPT-2's or holds only vocab.json and merges.txt, else
  ``AutoTokenizer``), wrapped as `HFTokenizer`.

A row opens with `open_ids` (GPT-2: end-of-text, which separates its training documents; a
tokenizer with its own beginning-of-sequence token: that one), and a chat model's rows can be
written in its chat template (`HFTokenizer.chat_prompt`).

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
import json
from pathlib import Path
from typing import Any, Protocol

from jlora.errors import CheckpointError, ConfigError, TokenizerError, describe
from jlora.exchange.hf_checkpoint import TOKENIZER_FILES, hub_folder, is_hub_id


class Tokenizer(Protocol):
    eos_token_id: int
    vocab_size: int
    # optional: open_ids, the tokens a row opens with (without: end-of-text, GPT-2's document separator)

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, and 256 as end-of-text."""

    eos_token_id: int = 256
    vocab_size: int = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    @property
    def open_ids(self) -> list[int]:
        """The tokens a row opens with: end-of-text."""
        return [self.eos_token_id]

    def chat_prompt(self, text: str) -> str:
        raise TokenizerError("the byte tokenizer has no chat template; use data.template: qa")

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
    """A transformers tokenizer seen through the protocol (no special tokens added on encode)."""

    hf: Any  # a transformers tokenizer: GPT2TokenizerFast, or what AutoTokenizer gives

    @property
    def open_ids(self) -> list[int]:
        """The tokens a row opens with: the beginning-of-sequence token, else end-of-text (GPT-2's are one)."""
        return [self.eos_token_id if self.hf.bos_token_id is None else self.hf.bos_token_id]

    def chat_prompt(self, text: str) -> str:
        """`text` as the user's turn in the tokenizer's chat template, up to the assistant's turn, without the
        leading beginning-of-sequence token (`open_ids` puts it there); TokenizerError if it has no template.

        For SmolLM2: ``system\n...<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n``.
        """
        if not getattr(self.hf, "chat_template", None):
            raise TokenizerError("the tokenizer has no chat template; use data.template: qa")
        turn = [{"role": "user", "content": text}]
        prompt = self.hf.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
        bos = self.hf.bos_token
        return prompt.removeprefix(bos) if bos and self.hf.bos_token_id is not None else prompt

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
    """Whether `directory` holds a tokenizer (tokenizer.json, or vocab.json and merges.txt)."""
    return (directory / "tokenizer.json").exists() or (
        (directory / "vocab.json").exists() and (directory / "merges.txt").exists()
    )


def load_tokenizer(source: str) -> ByteTokenizer | HFTokenizer:
    """``"bytes"``, a GGUF file or ``"smollm2"``, a directory with a tokenizer, or a Hub id (e.g. ``"gpt2"``).

    A Hub id is fetched by `jlora.exchange.hf_checkpoint.hub_folder` (the local cache when the
    Hub cannot be reached: one probe, no retries). Raises TokenizerError with a one-line reason
    when nothing usable can be loaded.
    """
    if source == "bytes":
        return ByteTokenizer()
    from jlora.exchange import gguf

    try:
        file = gguf.gguf_path(source)
        if file is not None:
            return HFTokenizer(gguf.gguf_tokenizer(file))
    except (CheckpointError, ConfigError) as e:
        raise TokenizerError(str(e)) from None
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
    from transformers import AutoTokenizer, GPT2TokenizerFast

    kind = GPT2TokenizerFast if _is_gpt2_folder(path) else AutoTokenizer
    what = "a GPT-2" if kind is GPT2TokenizerFast else "a"
    try:
        hf = kind.from_pretrained(str(path))
    except Exception as e:  # corrupt files: one line for the caller
        raise TokenizerError(f"could not load {what} tokenizer from {source!r} ({describe(e)})") from e
    if len(hf) < 2 or hf.eos_token_id is None:
        raise TokenizerError(
            f"could not load {what} tokenizer from {source!r} (empty vocabulary or no end-of-text token)"
        )
    return HFTokenizer(hf)


def _is_gpt2_folder(path: Path) -> bool:
    """A GPT-2 model's folder, or a bare tokenizer folder (vocab.json and merges.txt, no tokenizer_config.json)."""
    config = path / "config.json"
    if config.is_file():
        try:
            return json.loads(config.read_text()).get("model_type", "gpt2") == "gpt2"
        except (OSError, ValueError):
            return True
    return not (path / "tokenizer_config.json").exists() or not (path / "tokenizer.json").exists()
