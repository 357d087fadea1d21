"""PEFT folders of Llama-family adapters, both ways, against real PEFT on transformers' PyTorch models."""

import json

import jax
import numpy as np
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

import jlora
from jlora.core.lora.adapter import map_factors
from jlora.exchange.hf_checkpoint import load_model
from jlora.exchange.peft import load_peft, save_peft

IDS = np.random.default_rng(1).integers(0, 101, (2, 10))


def torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def jlora_logits(directory, cfg, lora, leaves=None):
    model, params = load_model(directory, lora=cfg)
    return np.asarray(model.apply({"params": jlora.tree.overlay(params, leaves), "lora": lora}, IDS))


def test_export_loads_in_peft_with_jloras_logits_and_back(tiny_llama, tmp_path):
    directory, reference = tiny_llama
    cfg = jlora.LoraConfig(
        r=4, alpha=8, target_modules=("q_proj", "v_proj", "gate_proj"), rank_pattern={"gate_proj": 2}
    )
    _, params = load_model(directory, lora=cfg)
    lora = map_factors(
        lambda x: 0.2 * jax.random.normal(jax.random.key(3), x.shape), jlora.init_lora(jax.random.key(0), cfg, params)
    )
    norm = {"norm": {"scale": params["norm"]["scale"] * 1.5}}  # a trained module saved whole
    out = save_peft(tmp_path / "adapter", lora, cfg, base_model_name_or_path=str(directory), modules_to_save=norm)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is False and config["modules_to_save"] == ["norm"]
    assert sorted(config["target_modules"]) == ["gate_proj", "q_proj", "v_proj"]
    peft = PeftModel.from_pretrained(type(reference).from_pretrained(directory), out).eval()
    ours = jlora_logits(directory, cfg, lora, norm)
    assert np.abs(ours - torch_logits(reference)).max() > 1e-3  # the adapters change the model
    np.testing.assert_allclose(torch_logits(peft), ours, atol=1e-4, rtol=0)
    back = load_peft(out)
    assert back.config == cfg
    for a, b in zip(jax.tree.leaves(back.lora), jax.tree.leaves(lora), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(back.modules_to_save["norm"]["scale"], norm["norm"]["scale"])


def test_five_adamw_steps_give_pefts_losses(tiny_llama, tmp_path):
    """PEFT's start (B made non-zero) read by jlora, the same batches, AdamW in both: losses within 1e-5 relative."""
    directory, reference = tiny_llama
    torch.manual_seed(0)
    peft = get_peft_model(
        type(reference).from_pretrained(directory), PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    )
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    peft.save_pretrained(tmp_path / "start")
    cfg, lora, _ = load_peft(tmp_path / "start")
    model, params = load_model(directory, lora=cfg)
    variables = {"params": params, "lora": lora}
    ocfg = jlora.OptimConfig(lr=1e-2, schedule="constant", clip_norm=None, total_steps=5)
    state, step = jlora.init_training(model, variables, ocfg, n_devices=1)

    trained = [p for p in peft.parameters() if p.requires_grad]
    adamw = torch.optim.AdamW(trained, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ours, theirs = [], []
    for batch in np.random.default_rng(0).integers(0, 101, (5, 4, 13)):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        state, metrics = step(
            state, {"input_ids": inputs, "targets": targets, "loss_mask": np.ones(inputs.shape)}, jax.random.key(0)
        )
        ours.append(float(metrics["loss"]))
        adamw.zero_grad()
        logits = peft(torch.tensor(inputs)).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 101), torch.tensor(targets).reshape(-1))
        loss.backward()
        adamw.step()
        theirs.append(float(loss))
    assert len(set(ours)) == 5  # the losses move
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
