"""`jlora export` of byte-tokenizer runs: a PEFT folder PEFT can load (random base included), a merged
checkpoint whose tokenizer and token ids transformers uses as jlora does."""

import functools
import json

import numpy as np
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from jlora.cli import main
from jlora.cli.export import BYTES_NOTE
from jlora.training.records.artifacts import load_run

from ..conftest import TINY_QA, sets

IDS = np.array([[256, 81, 117, 101, 115, 116], [87, 104, 97, 116, 32, 105]])
PROMPT = "Question: What is 23 plus 19?\nAnswer:"


@functools.cache
def run_logits(run) -> np.ndarray:
    model, params, lora, _, _ = load_run(run)
    return np.asarray(model.apply({"params": params, "lora": lora}, IDS))


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def test_peft_export_of_a_random_base_run_brings_its_base_and_loads_in_peft(default_run, tmp_path, capsys):
    from peft import PeftModel

    out = tmp_path / "adapter"
    capsys.readouterr()
    assert main(["export", str(default_run), "--peft", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"written to {out / 'base'}" in printed and BYTES_NOTE in printed
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        out.resolve() / "base"
    )

    base = GPT2LMHeadModel.from_pretrained(out / "base").eval()
    base_logits = torch_logits(base)
    adapted = PeftModel.from_pretrained(base, out).eval()  # the command's printed recipe
    expected = run_logits(default_run)
    np.testing.assert_allclose(torch_logits(adapted), expected, atol=1e-4, rtol=0)
    assert np.abs(base_logits - expected).max() > 1e-2  # the adapter and the trained ln_f matter
    assert AutoTokenizer.from_pretrained(out).encode("é?") == [195, 169, 63]  # bytes, as the run read them


def test_merged_export_generates_in_transformers_as_the_run_does(default_run, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["export", str(default_run), "--merged", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["bos_token_id"] == config["eos_token_id"] == 256 < config["vocab_size"] == 257
    merged = GPT2LMHeadModel.from_pretrained(out).eval()
    np.testing.assert_allclose(torch_logits(merged), run_logits(default_run), atol=1e-4, rtol=0)

    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert ids[0].tolist() == list(PROMPT.encode())
    with torch.no_grad():
        made = merged.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(made[0, ids.shape[1] :], skip_special_tokens=True)
    capsys.readouterr()
    # (test_generate asks the same length of the same model: one compiled decoding loop serves both)
    assert main(["generate", str(default_run), "--raw", "--prompt", PROMPT, "--max-new-tokens", "20"]) == 0
    assert capsys.readouterr().out == PROMPT + text + "\n"


def test_byte_tokenizer_run_on_a_base_with_its_own_tokenizer_exports_the_byte_tokenizer(
    tiny_hf_with_tokenizer, tmp_path, capsys
):
    """The base's BPE tokenizer must not travel with a run that read bytes (its ids mean other text)."""
    base, run = tiny_hf_with_tokenizer, tmp_path / "run"
    assert main(["train", "gpt2_qa", *sets(f"model={base}", "data.tokenizer=bytes", *TINY_QA), "--out", str(run)]) == 0
    assert AutoTokenizer.from_pretrained(base).encode("é") != [195, 169]  # the base's own ids differ
    assert main(["export", str(run), "--merged", str(tmp_path / "merged")]) == 0
    assert main(["export", str(run), "--peft", str(tmp_path / "peft")]) == 0
    assert capsys.readouterr().out.count(BYTES_NOTE) == 2
    for export in ("merged", "peft"):
        assert AutoTokenizer.from_pretrained(tmp_path / export).encode("é") == [195, 169]

    texts = []
    for source in (str(run), str(tmp_path / "merged"), str(tmp_path / "peft")):
        raw = ["--raw"] if source == str(run) else []  # exports take the text as written
        assert main(["generate", source, *raw, "--prompt", "Question: é?", "--max-new-tokens", "8"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] == texts[2] and texts[0].startswith("Question: é?")
