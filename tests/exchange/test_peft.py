"""PEFT exchange, checked against real PEFT on transformers' PyTorch GPT-2."""

import json
import warnings

import jax
import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.numpy import load_file, save_file
from transformers import GPT2LMHeadModel

import jlora
from jlora.core.lora.adapter import flatten_adapters
from jlora.exchange.hf_checkpoint import CheckpointError
from jlora.exchange.peft import load_peft, save_peft
from jlora.tree import overlay

IDS = np.array([[5, 17, 3, 88, 42, 9, 61, 2], [70, 1, 33, 33, 12, 99, 0, 54]])


def jlora_logits(directory, cfg, lora, modules_to_save=None):
    model, params = jlora.load_gpt2(directory, lora=cfg)
    params = overlay(params, modules_to_save)
    return np.asarray(model.apply({"params": params, "lora": lora}, IDS))


def peft_model(base_dir, adapter_dir):
    """PeftModel.from_pretrained, asserting PEFT found every adapter key and no stray one."""
    base = GPT2LMHeadModel.from_pretrained(base_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, adapter_dir)
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    result = model.load_adapter(adapter_dir, adapter_name="check")  # returns what from_pretrained only warns about
    assert result.missing_keys == [] and result.unexpected_keys == []
    model.set_adapter("default")
    return model.eval()


def torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))


def test_export_loads_in_peft_with_equal_logits(random_b, tiny_hf, tmp_path):
    directory, _ = tiny_hf
    cfg = jlora.LoraConfig(r=4, alpha=8, target_modules=("c_attn", "mlp.c_proj"), rank_pattern={"h.1.attn.c_attn": 2})
    model, params = jlora.load_gpt2(directory, lora=cfg)
    lora = random_b(jlora.init_lora(jax.random.key(0), model, params))
    ln_f = {"ln_f": {"scale": params["ln_f"]["scale"] * 1.5, "bias": params["ln_f"]["bias"] + 0.1}}
    out = save_peft(tmp_path / "adapter", lora, cfg, base_model_name_or_path=str(directory), modules_to_save=ln_f)

    config = json.loads((out / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "r", "lora_alpha", "fan_in_fan_out", "bias", "use_rslora")} == {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "fan_in_fan_out": True,
        "bias": "none",
        "use_rslora": False,
    }
    assert config["target_modules"] == ["c_attn", "mlp.c_proj"]
    assert config["rank_pattern"] == {"h.1.attn.c_attn": 2} and config["modules_to_save"] == ["ln_f"]
    assert config["base_model_name_or_path"] == str(directory)
    tensors = load_file(out / "adapter_model.safetensors")
    assert tensors["base_model.model.transformer.h.1.attn.c_attn.lora_A.weight"].shape == (2, 32)
    assert tensors["base_model.model.transformer.h.0.mlp.c_proj.lora_B.weight"].shape == (32, 4)
    assert "base_model.model.transformer.ln_f.weight" in tensors

    expected = jlora_logits(directory, cfg, lora, ln_f)
    assert not np.allclose(expected, jlora_logits(directory, cfg, lora))  # ln_f matters
    np.testing.assert_allclose(torch_logits(peft_model(directory, out)), expected, atol=1e-4, rtol=0)


def test_q_and_v_adapter_is_a_rank_2r_c_attn_adapter(random_b, tiny_hf, tmp_path):
    directory, _ = tiny_hf
    cfg = jlora.LoraConfig(r=2, alpha=4, target_modules=("c_attn.q", "c_attn.v"), rslora=True, alpha_pattern={"v": 6})
    model, params = jlora.load_gpt2(directory, lora=cfg)
    lora = random_b(jlora.init_lora(jax.random.key(0), model, params))
    out = save_peft(tmp_path / "qv", lora, cfg, base_model_name_or_path=str(directory))

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["target_modules"] == ["c_attn"]
    assert config["lora_alpha"] == pytest.approx(4 * np.sqrt(2))  # q's alpha / sqrt(r) kept at rank 2r
    tensors = load_file(out / "adapter_model.safetensors")
    a = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
    b = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    q, v = lora["h"]["0"]["attn"]["c_attn"]["q"], lora["h"]["0"]["attn"]["c_attn"]["v"]
    np.testing.assert_array_equal(a, np.concatenate([q["A"], v["A"]]))
    expected_b = np.zeros((96, 4), np.float32)
    expected_b[:32, :2], expected_b[64:, 2:] = q["B"], v["B"] * 6 / 4  # one scaling per PEFT module: v's ratio in B
    np.testing.assert_allclose(b, expected_b, rtol=1e-6, atol=0)

    np.testing.assert_allclose(
        torch_logits(peft_model(directory, out)), jlora_logits(directory, cfg, lora), atol=1e-4, rtol=0
    )
    back = load_peft(out)
    assert back.config == cfg
    assert jax.tree.structure(back.lora) == jax.tree.structure(lora)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=0), back.lora, lora)


@pytest.mark.parametrize(
    "options",
    [
        dict(
            target_modules=["c_attn", "c_proj"],
            rank_pattern={"h.1.attn.c_attn": 2},
            alpha_pattern={"mlp.c_proj": 3.0},
            use_rslora=True,
            modules_to_save=["ln_f"],
        ),
        dict(target_modules=r".*\.1\.mlp\.c_fc", init_lora_weights="gaussian", lora_dropout=0.1),
    ],
    ids=["patterns-rslora-ln_f", "regex-one-layer"],
)
def test_adapter_trained_in_pytorch_loads_in_jlora(tiny_hf, tmp_path, options):
    directory, _ = tiny_hf
    torch.manual_seed(0)
    model = get_peft_model(
        GPT2LMHeadModel.from_pretrained(directory),
        PeftLoraConfig(r=4, lora_alpha=8, fan_in_fan_out=True, task_type="CAUSAL_LM", **options),
    )
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = torch.randint(0, 101, (4, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(3):  # a few steps: B leaves zero, ln_f moves
        optimizer.zero_grad()
        model(batch, labels=batch).loss.backward()
        optimizer.step()
    model.eval().save_pretrained(tmp_path / "torch_adapter")

    cfg, lora, modules_to_save = load_peft(tmp_path / "torch_adapter")
    assert all(np.abs(a["B"]).max() > 0 for a in flatten_adapters(lora).values())
    assert cfg.rslora == options.get("use_rslora", False)
    assert cfg.dropout == options.get("lora_dropout", 0.0)
    assert (modules_to_save is None) == ("modules_to_save" not in options)
    if "rank_pattern" in options:
        assert lora["h"]["1"]["attn"]["c_attn"]["A"].shape == (2, 32)
        assert cfg.scaling_for("h.0.mlp.c_proj") == pytest.approx(3.0 / 2.0)  # alpha_pattern over sqrt(r)
    else:
        assert list(flatten_adapters(lora)) == ["h.1.mlp.c_fc"] and cfg.init == "gaussian"
    np.testing.assert_allclose(
        jlora_logits(directory, cfg, lora, modules_to_save), torch_logits(model), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize(
    "cfg",
    [
        jlora.LoraConfig(r=4, alpha=8),
        jlora.LoraConfig(
            r=2,
            alpha=8,
            target_modules=("c_attn.q", "c_attn.v", "c_fc"),
            rank_pattern={"v": 4},
            alpha_pattern={"v": 16},
        ),
        jlora.LoraConfig(r=2, alpha=2, target_modules=("c_attn.k", "c_proj"), layers=(1,), alpha_pattern={"k": 6.0}),
        jlora.LoraConfig(r=8, alpha=4, target_modules=(r"h\.0\.mlp\.c_fc",), rslora=True, dropout=0.05),
    ],
    ids=["c_attn", "qv-slices-rank-pattern", "k-slice-one-layer-alpha-pattern", "regex-rslora"],
)
def test_round_trip_returns_the_same_adapter(random_b, tiny_hf, tmp_path, cfg):
    """Exactly, whenever the slices of one module share a scaling (they do unless alpha_pattern splits them)."""
    directory, _ = tiny_hf
    model, params = jlora.load_gpt2(directory, lora=cfg)
    lora = random_b(jlora.init_lora(jax.random.key(3), model, params))
    ln_2 = {
        "h": {
            "1": {"ln_2": {"scale": params["h"]["1"]["ln_2"]["scale"] + 1.0, "bias": params["h"]["1"]["ln_2"]["bias"]}}
        }
    }
    out = save_peft(tmp_path / "a", lora, cfg, base_model_name_or_path="gpt2", modules_to_save=ln_2)
    back = load_peft(out)
    assert back.config == cfg
    assert_trees_equal(back.lora, lora)
    assert_trees_equal(back.modules_to_save, ln_2)


def test_peft_trained_slices_come_back_as_a_c_attn_adapter(random_b, tiny_hf, tmp_path):
    directory, _ = tiny_hf
    cfg = jlora.LoraConfig(r=2, alpha=4, target_modules=("c_attn.q", "c_attn.v"))
    model, params = jlora.load_gpt2(directory, lora=cfg)
    lora = random_b(jlora.init_lora(jax.random.key(0), model, params))
    out = save_peft(tmp_path / "qv", lora, cfg, base_model_name_or_path=str(directory))
    file = out / "adapter_model.safetensors"
    tensors = load_file(file)
    tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"][40, 0] = 0.5  # a k row, as training would
    save_file(tensors, file, metadata={"format": "pt", "jlora_lora_config": json.dumps(cfg.to_dict())})
    back = load_peft(out)
    assert list(flatten_adapters(back.lora)) == ["h.0.attn.c_attn", "h.1.attn.c_attn"]
    assert back.config.scaling_for("h.0.attn.c_attn") == cfg.scaling_for("h.0.attn.c_attn.q")
    np.testing.assert_allclose(
        jlora_logits(directory, back.config, back.lora),
        torch_logits(peft_model(directory, out)),
        atol=1e-4,
        rtol=0,
    )


def test_what_peft_cannot_represent_is_an_error_and_leaves_no_folder(tiny_hf, tmp_path):
    directory, _ = tiny_hf
    cfg = jlora.LoraConfig(r=2, alpha=4)
    model, params = jlora.load_gpt2(directory, lora=cfg)
    lora = jlora.init_lora(jax.random.key(0), model, params)
    cases = {
        "LM head tied": {"wte": {"embedding": params["wte"]["embedding"]}},
        "whole module": {"h": {"0": {"mlp": {"c_fc": {"bias": params["h"]["0"]["mlp"]["c_fc"]["bias"]}}}}},
        "carries an adapter": {"h": {"0": {"attn": {"c_attn": params["h"]["0"]["attn"]["c_attn"]}}}},
    }
    for message, leaves in cases.items():
        with pytest.raises(CheckpointError, match=message):
            save_peft(tmp_path / "out", lora, cfg, base_model_name_or_path="gpt2", modules_to_save=leaves)
    bad = jax.tree.map(lambda x: x.at[0, 0].set(np.nan) if x.ndim == 2 else x, lora)
    with pytest.raises(CheckpointError, match="non-finite"):
        save_peft(tmp_path / "out", bad, cfg, base_model_name_or_path="gpt2")
    assert list(tmp_path.iterdir()) == []
    save_peft(tmp_path / "out", lora, cfg, base_model_name_or_path="gpt2")
    with pytest.raises(CheckpointError, match="not empty"):
        save_peft(tmp_path / "out", lora, cfg, base_model_name_or_path="gpt2")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"use_dora": True}, "use_dora=True"),
        ({"peft_type": "IA3"}, "peft_type"),
        ({"bias": "all"}, "bias"),
        ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights"),
        ({"rank_pattern": {"h.0.attn.c_attn": 3}}, "rank 3"),
    ],
)
def test_unsupported_peft_options_are_clear_errors(tiny_hf, tmp_path, change, message):
    cfg = jlora.LoraConfig(r=2, alpha=4)
    model, params = jlora.load_gpt2(tiny_hf[0], lora=cfg)
    out = save_peft(tmp_path / "a", jlora.init_lora(jax.random.key(0), model, params), cfg, base_model_name_or_path="x")
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=message):
        load_peft(out)


def test_unsupported_target_is_a_clear_error(tiny_hf, tmp_path):
    directory, _ = tiny_hf
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(directory), PeftLoraConfig(r=2, target_modules=["lm_head"]))
    model.save_pretrained(tmp_path / "head")
    with pytest.raises(CheckpointError, match="unsupported PEFT target 'lm_head'"):
        load_peft(tmp_path / "head")
    with pytest.raises(CheckpointError, match="not a PEFT adapter folder"):
        load_peft(directory)
