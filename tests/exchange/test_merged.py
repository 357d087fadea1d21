"""The merged export, loaded back by transformers' PyTorch GPT-2."""

import json
import shutil

import jax
import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel, GPT2TokenizerFast

import jlora
from jlora.core.lora.adapter import map_factors
from jlora.exchange.hf_checkpoint import TOKENIZER_FILES, CheckpointError
from jlora.exchange.merged import save_merged
from jlora.tree import overlay

from ..conftest import make_hf_checkpoint, save_byte_level_tokenizer

IDS = np.array([[5, 17, 3, 88, 42, 9, 61, 2], [70, 1, 33, 33, 12, 99, 0, 54]])


@pytest.fixture
def base_with_tokenizer(tiny_hf, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_hf[0], base)
    save_byte_level_tokenizer(base)
    return base


def trained(model, params, cfg):
    lora = jlora.init_lora(jax.random.key(0), model, params)
    lora = map_factors(lambda x: 0.3 * jax.random.normal(jax.random.key(x.shape[0]), x.shape), lora)
    ln_f = {"ln_f": {"scale": params["ln_f"]["scale"] * 0.8, "bias": params["ln_f"]["bias"] - 0.1}}
    return lora, ln_f


def test_merged_export_loads_in_transformers_with_the_lora_models_logits(base_with_tokenizer, tmp_path):
    cfg = jlora.LoraConfig(r=4, alpha=8, target_modules=("c_attn.q", "c_attn.v", "c_fc"))
    model, params = jlora.load_gpt2(base_with_tokenizer, lora=cfg)
    lora, ln_f = trained(model, params, cfg)
    out = save_merged(tmp_path / "merged", model.config, params, lora, base_leaves=ln_f, base_dir=base_with_tokenizer)

    expected = np.asarray(model.apply({"params": overlay(params, ln_f), "lora": lora}, IDS))
    assert not np.allclose(expected, np.asarray(model.apply({"params": params}, IDS)), atol=1e-2)
    reference = GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        np.testing.assert_allclose(reference(torch.tensor(IDS)).logits.numpy(), expected, atol=1e-4, rtol=0)

    tokenizer_files = {p.name for p in base_with_tokenizer.iterdir() if p.name in TOKENIZER_FILES}
    assert tokenizer_files and tokenizer_files | {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    text = "Merged, with its tokenizer."
    assert GPT2TokenizerFast.from_pretrained(out).encode(text) == GPT2TokenizerFast.from_pretrained(
        base_with_tokenizer
    ).encode(text)
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 100  # the base's, not GPT-2's 50256
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_failed_merged_export_leaves_nothing(tiny_hf, tmp_path):
    cfg = jlora.LoraConfig(r=2, alpha=4)
    model, params = jlora.load_gpt2(tiny_hf[0], lora=cfg)
    lora = jlora.init_lora(jax.random.key(0), model, params)
    bad = map_factors(lambda x: x.at[0, 0].set(np.inf), lora)
    with pytest.raises(CheckpointError, match="non-finite"):
        save_merged(tmp_path / "merged", model.config, params, bad)
    assert list(tmp_path.iterdir()) == []
    save_merged(tmp_path / "merged", model.config, params, lora)
    with pytest.raises(CheckpointError, match="not empty"):
        save_merged(tmp_path / "merged", model.config, params, lora)


def test_export_command_writes_peft_and_merged_folders_of_a_run(tmp_path, capsys):
    """`jlora train` on a local checkpoint, then `jlora export --peft / --merged`, loaded by PEFT and transformers."""
    from peft import PeftModel

    from jlora.cli import main
    from jlora.training.records.artifacts import load_run

    base = tmp_path / "base"
    vocab = save_byte_level_tokenizer(base)
    make_hf_checkpoint(base, vocab_size=vocab, n_positions=80, n_embd=32, n_layer=2, n_head=2, eos_token_id=vocab - 1)
    run = tmp_path / "run"
    settings = [f"model={base}", "seq_len=64", "batch_size=4", "steps=2", "exact_match=0", "eval_every=1000"]
    settings += ["optim.lr=0.01", "optim.warmup_steps=0", "trainable.modules_to_save=[ln_f]"]
    overrides = [arg for s in settings for arg in ("--set", s)]
    assert main(["train", "configs/gpt2_qa.yaml", *overrides, "--out", str(run)]) == 0

    assert main(["export", str(run), "--peft", str(tmp_path / "peft")]) == 0
    assert main(["export", str(run), "--merged", str(tmp_path / "merged")]) == 0
    model, params, lora, _, _ = load_run(run)
    expected = np.asarray(model.apply({"params": params, "lora": lora}, IDS))
    peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), tmp_path / "peft").eval()
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        np.testing.assert_allclose(peft_model(torch.tensor(IDS)).logits.numpy(), expected, atol=1e-4, rtol=0)
        np.testing.assert_allclose(merged(torch.tensor(IDS)).logits.numpy(), expected, atol=1e-4, rtol=0)
    adapter_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert adapter_config["modules_to_save"] == ["ln_f"] and adapter_config["base_model_name_or_path"] == str(base)

    # The run (its prompt as written: --raw) and its merged export generate the same text.
    capsys.readouterr()
    for source, raw in ((run, ["--raw"]), (tmp_path / "merged", [])):
        assert main(["generate", str(source), *raw, "--prompt", "Q: what?", "--max-new-tokens", "8"]) == 0
    from_run, from_merged = capsys.readouterr().out.splitlines()
    assert from_run == from_merged and from_run.startswith("Q: what?")

    assert main(["export", str(tmp_path / "nowhere"), "--peft", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "jlora export: error: no adapter checkpoint" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
