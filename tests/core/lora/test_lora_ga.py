"""LoRA-GA's factors and residual base against PEFT's ``lora_ga_init`` for the same gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import LoraGAConfig as PeftLoraGAConfig
from peft import get_peft_model
from transformers import GPT2LMHeadModel

import jlora
from jlora.core.lora.config import LoraGAConfig
from jlora.core.lora.lora_ga import flip_signs, lora_ga_factors, lora_ga_init, sketch_size
from jlora.core.lora.residual import init_adapters
from jlora.errors import ConfigError
from jlora.exchange.hf_checkpoint import load_model

MODULES = ("h.0.attn.c_attn", "h.0.mlp.c_fc", "h.1.attn.c_attn", "h.1.mlp.c_fc")  # PEFT's order: named_modules


def gradients(seed: int = 0) -> dict[str, np.ndarray]:
    """A gradient per module in the kernel's (d_in, d_out) layout, of decaying spectrum (as real ones are)."""
    rng = np.random.default_rng(seed)
    shapes = {"attn.c_attn": (32, 96), "mlp.c_fc": (32, 128)}
    out = {}
    for path in MODULES:
        d_in, d_out = shapes[path.split(".", 2)[2]]
        u, v = rng.normal(size=(d_in, d_in)), rng.normal(size=(d_in, d_out))
        out[path] = ((u * 0.8 ** np.arange(d_in)) @ v / 10).astype(np.float32)
    return out


def sign_fixed_svd_lowrank(monkeypatch) -> list:
    """torch.svd_lowrank seeded per call (call i: seed i), with jlora's sign convention; returns the calls' shapes."""
    calls, original = [], torch.svd_lowrank

    def svd_lowrank(a, q=6, niter=2, M=None):
        torch.manual_seed(len(calls))
        calls.append((tuple(a.shape), q))
        u, s, v = original(a, q=q, niter=niter)
        u, vt = flip_signs(jnp.asarray(u.numpy()), jnp.asarray(v.numpy().T))
        return torch.tensor(np.asarray(u)), s, torch.tensor(np.asarray(vt).T)

    monkeypatch.setattr(torch, "svd_lowrank", svd_lowrank)
    return calls


def torch_sketch(seed: int, shape: tuple[int, int], r: int) -> jnp.ndarray:
    """The Gaussian sketch torch.svd_lowrank draws after ``manual_seed(seed)`` for a (d_out, d_in) matrix."""
    torch.manual_seed(seed)
    return jnp.asarray(torch.randn(*sketch_size(shape, r)).numpy())


@pytest.mark.parametrize(("direction", "scale"), [("ArB2r", "stable"), ("A2rBr", "gd_scale"), ("ArBr", "unit")])
def test_factors_and_residual_base_equal_pefts_for_the_same_gradients(tiny_hf, monkeypatch, direction, scale):
    directory, _ = tiny_hf
    r, alpha = 4, 8
    grads = gradients()
    calls = sign_fixed_svd_lowrank(monkeypatch)
    reference = GPT2LMHeadModel.from_pretrained(directory)
    modules = dict(reference.named_modules())
    for path, g in grads.items():
        modules[f"transformer.{path}"]._peft_loraga_grad = torch.tensor(g)  # Conv1D: the kernel's layout
    config = PeftLoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=["c_attn", "c_fc"],
        init_lora_weights="lora_ga",
        fan_in_fan_out=True,
        lora_ga_config=PeftLoraGAConfig(direction=direction, scale=scale),
    )
    peft = get_peft_model(reference, config)
    assert [c[0] for c in calls] == [grads[p].T.shape for p in MODULES]  # PEFT decomposes the (d_out, d_in) gradient

    cfg = jlora.LoraConfig(r=r, alpha=alpha, target_modules=("c_attn", "c_fc"), init="lora_ga")
    cfg = cfg.replace(lora_ga=LoraGAConfig(direction=direction, scale=scale))
    _, params = load_model(directory, lora=cfg)
    init = {}
    for i, path in enumerate(MODULES):
        g = jnp.asarray(grads[path]).T
        a, b = lora_ga_factors(g, r, cfg.scaling_for(path), cfg.lora_ga, sketch=torch_sketch(i, g.shape, r))
        init[path] = {"A": a, "B": b}
    residual, lora = init_adapters(jax.random.key(0), cfg, params, init=jlora.unflatten_adapters(init))

    named = dict(peft.named_modules())
    for path, adapter in jlora.flatten_adapters(lora).items():
        layer = named[f"base_model.model.transformer.{path}"]
        np.testing.assert_allclose(adapter["A"], layer.lora_A["default"].weight.detach().numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(adapter["B"], layer.lora_B["default"].weight.detach().numpy(), atol=1e-5, rtol=0)
        kernel = jlora.tree.get_path(residual, path)["kernel"]
        np.testing.assert_allclose(kernel, layer.base_layer.weight.detach().numpy(), atol=1e-5, rtol=0)
        assert np.abs(np.asarray(kernel) - np.asarray(jlora.tree.get_path(params, path)["kernel"])).max() > 1e-3


def test_lora_ga_leaves_the_model_unchanged_at_step_0(tiny_hf):
    directory, _ = tiny_hf
    cfg = jlora.LoraConfig(r=4, alpha=8, target_modules=("c_attn.q", "c_proj"), init="lora_ga")
    model, params = load_model(directory, lora=cfg)
    grads = {p: jnp.asarray(g) for p, g in gradients(1).items() if p.endswith("c_attn")}
    rng = np.random.default_rng(2)
    for path in ("h.0.attn.c_proj", "h.0.mlp.c_proj", "h.1.attn.c_proj", "h.1.mlp.c_proj"):
        grads[path] = jnp.asarray(rng.normal(size=jlora.tree.get_path(params, path)["kernel"].shape), jnp.float32)
    init = lora_ga_init(jax.random.key(0), cfg, params, grads)
    assert set(init) == set(cfg.module_paths(params))
    assert init["h.0.attn.c_attn.q"]["B"].shape == (32, 4)  # the q slice: its third of the gradient
    residual, lora = init_adapters(jax.random.key(0), cfg, params, init=jlora.unflatten_adapters(init))
    ids = rng.integers(0, 101, (2, 9))
    np.testing.assert_allclose(
        model.apply({"params": residual, "lora": lora}, ids), model.apply({"params": params}, ids), atol=1e-5
    )
    with pytest.raises(ConfigError, match=r"2r <= 32"):
        lora_ga_init(jax.random.key(0), cfg.replace(r=17), params, grads)
    with pytest.raises(ConfigError, match="LoRA-GA's factors come from gradients"):
        init_adapters(jax.random.key(0), cfg, params)


def test_weight_svd_scale_matches_ws_top_singular_value_and_random_shares_indices():
    rng = np.random.default_rng(0)
    g = jnp.asarray(rng.normal(size=(20, 12)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(20, 12)), jnp.float32)
    key = jax.random.key(3)
    _, b_unit = lora_ga_factors(g, 3, 1.0, LoraGAConfig(scale="unit"), key=key)
    _, b_svd = lora_ga_factors(g, 3, 1.0, LoraGAConfig(scale="weight_svd"), weight=w, key=key)
    s_b = np.linalg.norm(np.asarray(b_unit), axis=0)  # ArB2r: B's columns are u_i s_i, i = r..2r-1
    np.testing.assert_allclose(np.asarray(b_svd), np.asarray(b_unit) * np.linalg.norm(w, 2) / s_b[0], rtol=1e-5)
    a, b = lora_ga_factors(g, 3, 1.0, LoraGAConfig(direction="random", scale="unit"), key=key)
    u, s, vt = np.linalg.svd(np.asarray(g))
    picked = [int(np.abs(np.abs(vt[:6] @ np.asarray(row)) - 1).argmin()) for row in a]
    assert len(set(picked)) == 3
    np.testing.assert_allclose(np.linalg.norm(np.asarray(b), axis=0), s[picked], rtol=1e-3)
