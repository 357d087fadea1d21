"""`jlora train` on a random Llama-family model: exact resume after SIGKILL, a population member against its
solo run, the chat template, and the run's adapter going to PEFT and to a merged checkpoint transformers loads."""

import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import LlamaForCausalLM

from jlora.cli import main
from jlora.core.lora.adapter import flatten_adapters
from jlora.training.records.artifacts import load_run
from jlora.training.records.checkpoint import find_checkpoint, load_adapter
from jlora.training.run.config import DEFAULT_CONFIG, load_run_config
from jlora.training.run.train import train

from ...conftest import BUCKETS
from .test_population_run import member_losses
from .test_train import cli, finish, kill_after_first_checkpoint, sets, train_losses

LLAMA = [
    "model.random={model_type: llama, hidden_size: 32, intermediate_size: 48, num_hidden_layers: 2,"
    " num_attention_heads: 4, num_key_value_heads: 2, tie_word_embeddings: false}",
    "lora.target_modules=[q_proj, v_proj, down_proj]",
    "trainable.modules_to_save=[norm]",
    "seq_len=64",
    BUCKETS,
    "batch_size=8",
    "log_every=1",
    "exact_match=8",
    "eval_every=1000",
    "eval_batches=2",
    "eval.forgetting=null",
]
MEMBERS = "population={members: [{r: 2, alpha: 2r, seed: 1}, {r: 4, alpha: 8, seed: 3, lr: 5e-3}]}"


def test_resume_after_sigkill_is_exact(tmp_path):
    args = sets(*LLAMA, "steps=8", "checkpoint.every=4")
    reference = cli(*args, "--out", str(tmp_path / "reference"))
    kill_after_first_checkpoint(args, tmp_path / "killed")
    finish(reference)
    assert "resuming at step 4" in finish(cli(*args, "--out", str(tmp_path / "killed")))
    expected, resumed = train_losses(tmp_path / "reference"), train_losses(tmp_path / "killed")
    assert sorted(resumed) == list(range(1, 9)) and resumed == expected  # bit for bit


def test_a_population_member_is_its_solo_run(tmp_path):
    both = [*LLAMA, "steps=6", "checkpoint.every=6"]
    train(load_run_config(DEFAULT_CONFIG, [*both, MEMBERS]), tmp_path / "population", progress=False)
    solo = ["lora.r=4", "lora.alpha=8", "adapter_seed=3", "optim.lr=5e-3"]
    train(load_run_config(DEFAULT_CONFIG, [*both, *solo]), tmp_path / "solo", progress=False)
    member, alone = member_losses(tmp_path / "population", 1), member_losses(tmp_path / "solo", None)
    np.testing.assert_allclose([member[s] for s in range(1, 7)], [alone[s] for s in range(1, 7)], rtol=0, atol=1e-5)
    lora, _, _ = load_adapter(find_checkpoint(tmp_path / "population"), 1)
    solo_lora, _, _ = load_adapter(find_checkpoint(tmp_path / "solo"))
    for path, adapter in flatten_adapters(lora).items():
        np.testing.assert_allclose(adapter["B"], flatten_adapters(solo_lora)[path]["B"], rtol=0, atol=1e-5)


def test_exports_load_in_transformers_and_peft_with_the_runs_logits(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *sets(*LLAMA, "steps=3", "checkpoint.every=3", "optim.lr=0.05"), "--out", str(run)]) == 0
    model, params, lora, cfg, _ = load_run(run)
    ids = np.random.default_rng(0).integers(0, 257, (2, 9))
    expected = np.asarray(model.apply({"params": params, "lora": lora}, ids))
    assert main(["export", str(run), "--merged", str(tmp_path / "merged")]) == 0
    assert main(["export", str(run), "--peft", str(tmp_path / "peft")]) == 0
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    base = LlamaForCausalLM.from_pretrained(tmp_path / "peft" / "base")
    peft = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["modules_to_save"] == ["norm"]
    with torch.no_grad():
        for reference in (merged, peft):
            np.testing.assert_allclose(reference(torch.tensor(ids)).logits.numpy(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("bad", ["lora.target_modules=[c_attn]", "trainable.modules_to_save=[ln_f]"])
def test_a_gpt2_name_on_a_llama_is_one_line(bad, tmp_path, capsys):
    assert main(["train", *sets(*LLAMA, bad), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("c_attn" in err or "ln_f" in err)
    assert not (tmp_path / "run").exists()
