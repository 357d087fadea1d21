"""AdaLoRA adapters through PEFT's format (peft_type ADALORA) both ways, and as a plain LoRA with a rank_pattern."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import torch
from peft import AdaLoraConfig as PeftAdaLoraConfig
from peft import PeftModel, get_peft_model
from transformers import GPT2LMHeadModel

import jlora
from jlora.core.lora.adalora import AdaLoraConfig
from jlora.exchange.hf_checkpoint import load_model
from jlora.exchange.peft import load_peft, save_peft

IDS = np.random.default_rng(1).integers(0, 101, (2, 10))
TARGETS = ("c_attn", "c_fc")


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def jlora_logits(directory, cfg, lora) -> np.ndarray:
    model, params = load_model(directory, lora=cfg)
    return np.asarray(model.apply({"params": params, "lora": lora}, IDS))


def pruned_adapters(directory):
    """An AdaLoRA tree as after training: A, B, E random, E = 0 on some triplets (all of one module's)."""
    cfg = jlora.LoraConfig(r=4, alpha=8, target_modules=TARGETS, init="adalora")
    _, params = load_model(directory, lora=cfg)
    lora = jlora.init_lora(jax.random.key(0), cfg, params)
    masks = [[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]]
    flat = {}
    for i, (path, adapter) in enumerate(jlora.flatten_adapters(lora).items()):
        e = jax.random.normal(jax.random.key(10 + i), (4,)) * jnp.asarray(masks[i], jnp.float32)
        flat[path] = {**adapter, "A": adapter["A"] * 20, "E": e, "B": adapter["B"] * 20}
    return cfg, jlora.unflatten_adapters(flat)


def test_export_is_pefts_adalora_format_and_loads_with_jloras_logits_and_back(tiny_hf, tmp_path):
    directory, reference = tiny_hf
    cfg, lora = pruned_adapters(directory)
    settings = AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=1, total_step=10)
    out = save_peft(tmp_path / "adalora", lora, cfg, base_model_name_or_path=str(directory), adalora=settings)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and (config["init_r"], config["target_r"], config["total_step"]) == (
        4,
        2,
        10,
    )
    assert config["rank_pattern"]["transformer.h.0.attn.c_attn.lora_E"] == [True, False, True, True]
    assert config["rank_pattern"]["transformer.h.0.mlp.c_fc.lora_E"] == [True] * 4  # all masked: kept whole (E = 0)
    peft = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(directory), out).eval()
    ours = jlora_logits(directory, cfg, lora)
    assert np.abs(ours - torch_logits(reference)).max() > 1e-3  # the adapters change the model
    np.testing.assert_allclose(torch_logits(peft), ours, atol=1e-4, rtol=0)

    back = load_peft(out)
    assert back.config == cfg
    for path, adapter in jlora.flatten_adapters(back.lora).items():
        original = jlora.flatten_adapters(lora)[path]
        np.testing.assert_allclose(adapter["E"], original["E"], atol=1e-7)
        keep = np.asarray(original["E"]) != 0
        np.testing.assert_allclose(np.asarray(adapter["A"])[keep], np.asarray(original["A"])[keep], atol=1e-7)
        assert float(adapter["scaling"]) == float(original["scaling"])
    np.testing.assert_allclose(jlora_logits(directory, back.config, back.lora), ours, atol=1e-6)


def test_a_peft_trained_adalora_folder_loads_with_pefts_logits(tiny_hf, tmp_path):
    directory, _ = tiny_hf
    torch.manual_seed(0)
    config = PeftAdaLoraConfig(
        init_r=6, target_r=2, lora_alpha=8, target_modules=list(TARGETS), total_step=6, tinit=1, tfinal=1,
        fan_in_fan_out=True, task_type="CAUSAL_LM",
    )  # fmt: skip
    peft = get_peft_model(GPT2LMHeadModel.from_pretrained(directory), config)
    adamw = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=5e-2)
    for step, ids in enumerate(np.random.default_rng(0).integers(0, 101, (5, 4, 12))):
        peft(input_ids=torch.tensor(ids), labels=torch.tensor(ids)).loss.backward()
        adamw.step()
        peft.base_model.update_and_allocate(step)
        adamw.zero_grad()
    peft.save_pretrained(tmp_path / "peft")
    loaded = load_peft(tmp_path / "peft")
    assert loaded.config.init == "adalora" and loaded.config.r == 6
    assert any(not bool(np.asarray(a["E"]).all()) for a in jlora.flatten_adapters(loaded.lora).values())
    np.testing.assert_allclose(
        jlora_logits(directory, loaded.config, loaded.lora), torch_logits(peft.eval()), atol=1e-4, rtol=0
    )


def test_as_lora_export_is_a_plain_lora_with_the_kept_ranks(tiny_hf, tmp_path):
    from peft import PeftModel

    directory, _ = tiny_hf
    cfg, lora = pruned_adapters(directory)
    out = save_peft(tmp_path / "plain", lora, cfg, base_model_name_or_path=str(directory), as_lora=True)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    ranks = {
        p: config["rank_pattern"].get(p, config["r"]) for p in ("h.0.attn.c_attn", "h.1.attn.c_attn", "h.1.mlp.c_fc")
    }
    assert ranks == {"h.0.attn.c_attn": 3, "h.1.attn.c_attn": 4, "h.1.mlp.c_fc": 1}
    assert "h.0.mlp.c_fc" not in json.dumps(config["target_modules"])  # nothing kept: no adapter
    peft = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(directory), out).eval()
    np.testing.assert_allclose(torch_logits(peft), jlora_logits(directory, cfg, lora), atol=1e-4, rtol=0)
    back = load_peft(out)
    np.testing.assert_allclose(
        jlora_logits(directory, back.config, back.lora), jlora_logits(directory, cfg, lora), atol=1e-5
    )
