"""DoRA and PiSSA / OLoRA exchanged with real PEFT on transformers' PyTorch GPT-2, both ways."""

import json

import jax
import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from safetensors.numpy import load_file
from transformers import GPT2LMHeadModel

import jlora
from jlora.core.lora.adapter import flatten_adapters
from jlora.core.lora.residual import as_plain_lora
from jlora.exchange.peft import load_peft, save_peft

from .test_peft import IDS, assert_trees_equal, jlora_logits, peft_model, torch_logits


def peft_dora(directory, **options):
    """A fresh PEFT DoRA model on the tiny GPT-2 (A kaiming, B = 0, m = ||W_j||), seeded."""
    torch.manual_seed(0)
    config = PeftLoraConfig(r=4, lora_alpha=8, fan_in_fan_out=True, use_dora=True, task_type="CAUSAL_LM", **options)
    return get_peft_model(GPT2LMHeadModel.from_pretrained(directory), config)


def test_dora_trained_in_pytorch_loads_in_jlora(tiny_hf, tmp_path):
    directory, _ = tiny_hf
    model = peft_dora(directory, target_modules=["c_attn", "mlp.c_proj"], modules_to_save=["ln_f"])
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = torch.randint(0, 101, (4, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        optimizer.zero_grad()
        model(batch, labels=batch).loss.backward()
        optimizer.step()
    model.eval().save_pretrained(tmp_path / "dora")
    assert any(k.endswith("lora_magnitude_vector") for k in load_file(tmp_path / "dora" / "adapter_model.safetensors"))

    cfg, lora, ln_f = load_peft(tmp_path / "dora")
    assert cfg.use_dora and list(flatten_adapters(lora)) == [
        f"h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "mlp.c_proj")
    ]
    adapter = flatten_adapters(lora)["h.0.attn.c_attn"]
    assert adapter["m"].shape == (96,)
    norms = np.linalg.norm(np.asarray(jlora.load_gpt2(directory)[1]["h"]["0"]["attn"]["c_attn"]["kernel"]), axis=0)
    assert np.abs(np.asarray(adapter["m"]) - norms).max() > 1e-3  # the magnitudes trained
    np.testing.assert_allclose(jlora_logits(directory, cfg, lora, ln_f), torch_logits(model), atol=1e-4, rtol=0)


def test_jlora_dora_exports_to_peft_and_back(tiny_hf, random_b, tmp_path):
    directory, _ = tiny_hf
    cfg = jlora.LoraConfig(r=4, alpha=8, target_modules=("c_attn", "c_fc"), rank_pattern={"c_fc": 2}, use_dora=True)
    model, params = jlora.load_gpt2(directory, lora=cfg)
    lora = random_b(jlora.init_lora(jax.random.key(0), model, params), scale=0.2)
    lora = jax.tree_util.tree_map_with_path(lambda p, x: x * 0.8 if p[-1].key == "m" else x, lora)
    out = save_peft(tmp_path / "dora", lora, cfg, base_model_name_or_path=str(directory))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["rank_pattern"] == {f"h.{i}.mlp.c_fc": 2 for i in (0, 1)}
    tensors = load_file(out / "adapter_model.safetensors")
    np.testing.assert_array_equal(
        tensors["base_model.model.transformer.h.1.mlp.c_fc.lora_magnitude_vector"], lora["h"]["1"]["mlp"]["c_fc"]["m"]
    )
    np.testing.assert_allclose(
        torch_logits(peft_model(directory, out)), jlora_logits(directory, cfg, lora), atol=1e-4, rtol=0
    )
    back = load_peft(out)
    assert back.config == cfg
    assert_trees_equal(back.lora, lora)


def test_five_adamw_steps_give_pefts_losses(tiny_hf, tmp_path):
    """The same DoRA start in both (PEFT's, B made non-zero), the same batches: per-step losses within 1e-4."""
    directory, _ = tiny_hf
    reference = peft_dora(directory, target_modules=["c_attn", "c_fc"])
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    reference.save_pretrained(tmp_path / "start")
    cfg, lora, _ = load_peft(tmp_path / "start")
    model, params = jlora.load_gpt2(directory, lora=cfg)
    variables = {"params": params, "lora": lora}
    mask = jlora.trainable_mask(variables)
    ocfg = jlora.OptimConfig(lr=1e-2, schedule="constant", clip_norm=None, total_steps=5)
    optimizer = jlora.make_optimizer(ocfg, jlora.partition(variables, mask)[0])
    state = jlora.init_state(variables, mask, optimizer)
    step = jlora.make_train_step(model, optimizer, ocfg, n_devices=1, dropout=False)

    reference.eval()  # no dropout (GPT-2's own); the gradients flow all the same
    params_torch = [p for p in reference.parameters() if p.requires_grad]
    torch_adamw = torch.optim.AdamW(params_torch, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ids = np.random.default_rng(0).integers(0, 101, (5, 4, 13))
    ours, theirs = [], []
    for batch in ids:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        state, metrics = step(
            state, {"input_ids": inputs, "targets": targets, "loss_mask": np.ones(inputs.shape)}, None
        )
        ours.append(float(metrics["loss"]))
        torch_adamw.zero_grad()
        logits = reference(torch.tensor(inputs)).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 101), torch.tensor(targets).reshape(-1))
        loss.backward()
        torch_adamw.step()
        theirs.append(float(loss))
    assert len(set(ours)) == 5  # the losses move
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)


def test_pissa_factors_and_residual_are_pefts(tiny_hf):
    """PEFT's "pissa" on transformers' GPT-2 (Conv1D: fan_in_fan_out) against init_adapters on the same weights."""
    directory, _ = tiny_hf
    torch.manual_seed(0)
    config = PeftLoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights="pissa"
    )
    reference = get_peft_model(GPT2LMHeadModel.from_pretrained(directory), config)
    cfg = jlora.LoraConfig(r=4, alpha=8, target_modules=("c_attn", "c_fc"), init="pissa")
    _, params = jlora.load_gpt2(directory, lora=cfg)
    residual, lora = jlora.init_adapters(jax.random.key(0), cfg, params)
    for path, adapter in flatten_adapters(lora).items():
        module = reference.base_model.model.transformer.get_submodule(path)
        a, b = module.lora_A["default"].weight.detach().numpy(), module.lora_B["default"].weight.detach().numpy()
        np.testing.assert_allclose(np.asarray(adapter["B"] @ adapter["A"]), b @ a, atol=1e-5)  # sign-free
        kernel = jlora.tree.get_path(residual, path)["kernel"]
        np.testing.assert_allclose(kernel, module.base_layer.weight.detach().numpy(), atol=1e-5)  # (d_in, d_out) both


@pytest.mark.parametrize(
    "options",
    [
        dict(init="pissa", target_modules=("c_attn", "mlp.c_proj")),
        dict(init="olora", target_modules=("c_attn.q", "c_attn.v"), rslora=True, alpha=4.0),
        dict(init="pissa_niter_2", target_modules=("c_fc",), use_dora=True),
    ],
    ids=["pissa", "olora-qv-rslora", "pissa-niter-dora"],
)
def test_residual_inits_export_as_rank_2r_lora_on_the_unmodified_base(tiny_hf, tmp_path, options):
    directory, _ = tiny_hf
    cfg = jlora.LoraConfig(r=2, **{"alpha": 4.0, **options})
    model, params = jlora.load_gpt2(directory, lora=cfg)
    residual, init = jlora.init_adapters(jax.random.key(0), cfg, params)

    def noise(p, x):  # as if trained: the factors move, each adapter's scale stays
        return x if p[-1].key == "scaling" else x + 0.05 * jax.random.normal(jax.random.key(len(p)), x.shape)

    trained = jax.tree_util.tree_map_with_path(noise, init)
    expected = np.asarray(model.apply({"params": residual, "lora": trained}, IDS))
    out = save_peft(tmp_path / "adapter", trained, cfg, base_model_name_or_path=str(directory), init=init)

    config = json.loads((out / "adapter_config.json").read_text())
    fused = 2 if options["target_modules"][0].startswith("c_attn.") else 1  # q and v go out as one c_attn adapter
    assert config["r"] == 2 * cfg.r * fused and config["init_lora_weights"] is True
    assert config["use_dora"] == cfg.use_dora
    np.testing.assert_allclose(torch_logits(peft_model(directory, out)), expected, atol=1e-4, rtol=0)
    back = load_peft(out)  # the converted adapter, on the unmodified base
    plain, plain_cfg = as_plain_lora(trained, init, cfg)
    assert back.config == plain_cfg
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), back.lora, plain)
    np.testing.assert_allclose(jlora_logits(directory, back.config, back.lora), expected, atol=1e-4, rtol=0)
