"""Runs that choose ranks: EVA and LoRA-GA (made from the data) resume exactly without reading a batch again,
AdaLoRA resumes exactly with its allocator; their PEFT exports load in PEFT with jlora's logits."""

import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import GPT2LMHeadModel

import jlora
from jlora.cli import main
from jlora.core.lora.config import pattern_value
from jlora.training.records.artifacts import load_run
from jlora.training.records.metrics import read_metrics
from jlora.training.run import build
from jlora.training.run.config import load_run_config
from jlora.training.run.train import train

from ...conftest import TINY_DEFAULT

TWO_LAYERS = [*TINY_DEFAULT, "model.random={n_layer: 2, n_embd: 32, n_head: 2, n_positions: 64}", "steps=4"]
TWO_LAYERS += ["checkpoint.every=2", "eval_every=4", "exact_match=0", "eval.forgetting=null"]
IDS = np.array([[256, 81, 117, 101, 115, 116], [87, 104, 97, 116, 32, 105]])


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def run_twice(tmp_path, overrides: list[str], monkeypatch, probe: str | None) -> tuple:
    """(paused-and-resumed run, uninterrupted run): the resumed half must not call `probe` (build's data probe)."""
    cfg = load_run_config("default", [*TWO_LAYERS, *overrides])
    train(cfg, tmp_path / "reference", progress=False)
    train(cfg, tmp_path / "resumed", progress=False, until=2)

    def refuse(*args, **kwargs):
        raise AssertionError(f"a resumed run called {probe} again")

    if probe is not None:
        monkeypatch.setattr(build, probe, refuse)
    train(cfg, tmp_path / "resumed", progress=False)
    return tmp_path / "resumed", tmp_path / "reference"


def peft_logits(run, tmp_path, *flags: str) -> tuple[np.ndarray, dict]:
    out = tmp_path / f"peft{'-'.join(flags)}"
    assert main(["export", str(run), "--peft", str(out), *flags]) == 0
    model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(out / "base"), out).eval()
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy(), json.loads((out / "adapter_config.json").read_text())


def jlora_logits(run, **kwargs) -> np.ndarray:
    model, params, lora, _, _ = load_run(run, **kwargs)
    return np.asarray(model.apply({"params": params, "lora": lora}, IDS))


def test_an_eva_run_resumes_exactly_with_its_ranks_and_exports_them_to_peft(tmp_path, monkeypatch):
    overrides = ["lora.init=eva", "lora.eva.batches=20"]
    resumed, reference = run_twice(tmp_path, overrides, monkeypatch, "eva_adapters")
    assert losses(resumed) == losses(reference)  # bit for bit
    meta = json.loads((resumed / "checkpoints" / "4" / "meta" / "metadata").read_text())
    ranks = meta["lora_config"]["rank_pattern"]
    assert ranks and set(ranks.values()) != {8}  # the budget was redistributed
    theirs, config = peft_logits(resumed, tmp_path)
    paths = [f"h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    rank = {p: pattern_value(config["rank_pattern"], p, config["r"]) for p in paths}
    alpha = {p: pattern_value(config["alpha_pattern"], p, config["lora_alpha"]) for p in paths}
    assert rank == {p: ranks.get(p, 8) for p in paths}
    assert alpha == {p: 2 * k for p, k in rank.items()}  # alpha follows the rank
    np.testing.assert_allclose(theirs, jlora_logits(resumed), atol=1e-4, rtol=0)


def test_a_lora_ga_run_resumes_exactly_on_its_residual_and_exports_a_plain_lora(tmp_path, monkeypatch):
    resumed, reference = run_twice(tmp_path, ["lora.init=lora_ga"], monkeypatch, "weight_gradients")
    assert losses(resumed) == losses(reference)
    theirs, config = peft_logits(resumed, tmp_path)
    assert config["r"] == 16 and config["init_lora_weights"] is True  # rank 2r on the unmodified base
    np.testing.assert_allclose(theirs, jlora_logits(resumed), atol=1e-4, rtol=0)
    np.testing.assert_allclose(jlora_logits(resumed, original_base=True), jlora_logits(resumed), atol=1e-5)


def test_a_lora_ga_run_starts_from_the_base_model(tmp_path):
    """Step 0's evaluation is the base's (W_res + s B0 A0 = W), as a plain LoRA run's (B = 0) is."""
    first = {}
    for init in ("lora_ga", "kaiming"):
        train(
            load_run_config("default", [*TWO_LAYERS, f"lora.init={init}", "steps=1"]), tmp_path / init, progress=False
        )
        first[init] = next(r["val_loss"] for r in read_metrics(tmp_path / init) if r["step"] == 0 and "val_loss" in r)
    assert first["lora_ga"] == pytest.approx(first["kaiming"], abs=1e-5)


ADALORA = "adalora={init_r: 6, target_r: 2, tinit: 1, tfinal: 1, deltaT: 1}"


def test_an_adalora_run_prunes_in_the_step_resumes_exactly_and_exports_both_ways(tmp_path, monkeypatch):
    resumed, reference = run_twice(tmp_path, [ADALORA, "lora.target_modules=[c_attn, c_fc]"], monkeypatch, None)
    assert losses(resumed) == losses(reference)  # the allocator's state (EMAs, final mask) resumes too
    meta = json.loads((resumed / "checkpoints" / "4" / "meta" / "metadata").read_text())
    assert meta["lora_config"]["init"] == "adalora" and meta["lora_config"]["r"] == 6
    assert meta["adalora"]["total_step"] == 4
    model, params, lora, _, _ = load_run(resumed)
    alive = [int((np.asarray(a["E"]) != 0).sum()) for a in jlora.flatten_adapters(lora).values()]
    assert sum(alive) <= 2 * 4 < 6 * 4  # the final budget: target_r per module on average
    ours = jlora_logits(resumed)
    theirs, config = peft_logits(resumed, tmp_path)
    assert config["peft_type"] == "ADALORA" and config["total_step"] == 4
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    theirs, config = peft_logits(resumed, tmp_path, "--as-lora")
    assert config["peft_type"] == "LORA"
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["adalora={init_r: 4, target_r: 6}"], "adalora: target_r=6 must be <= init_r=4"),
        (["adalora={tinit: 2, tfinal: 2}"], "adalora.tinit=2 + tfinal=2 must be < the schedule's 4 steps"),
        (["adalora={target_r: 2}", "lora.use_dora=true"], "adalora: cannot be combined with lora.use_dora"),
        (["lora.init=adalora"], "lora.init=adalora needs an adalora: section"),
        (
            ["lora.init=eva", "lora.eva.rho=3"],
            "EVA offers h.0.attn.c_attn round(r * rho) = 36 components but its input",
        ),
        (["lora.init=lora_ga", "model.param_dtype=bfloat16"], "lora.init=lora_ga needs float32 base weights"),
        (["lora.init=eva", "population.grid={r: [2, 4]}"], "lora.init=eva is not available in a population"),
        (["lora.init=lora_ga", "lora.use_dora=true"], "lora.init=lora_ga with lora.use_dora is not supported"),
    ],
)
def test_bad_inits_are_one_line_and_exit_2(overrides, message, tmp_path, capsys):
    args = [arg for item in [*TWO_LAYERS, "lora.r=12", *overrides] for arg in ("--set", item)]
    assert main(["train", "default", *args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
