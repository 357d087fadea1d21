"""Planting a known low-rank update; subspace similarity on both sides of dW; rows sampled from a teacher."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.core.lora.adapter import flatten_adapters, unflatten_adapters, with_scaling
from jlora.core.lora.config import LoraConfig
from jlora.core.models.gpt2 import GPT2, GPT2Config, init_params
from jlora.errors import ConfigError
from jlora.research.planted import (
    compare_to_planted,
    delta_subspaces,
    plant_low_rank,
    sharpen,
    teacher_rows,
)


def params_tree(key, d=16):
    k1, k2, k3 = jax.random.split(key, 3)
    block = {
        "ln_1": {"scale": 1.0 + 0.1 * jax.random.normal(k3, (d,)), "bias": jnp.zeros(d)},
        "attn": {"c_attn": {"kernel": 0.02 * jax.random.normal(k1, (d, 3 * d)), "bias": jnp.zeros(3 * d)}},
        "mlp": {"c_proj": {"kernel": 0.02 * jax.random.normal(k2, (4 * d, d)), "bias": jnp.zeros(d)}},
    }
    return {"h": {"0": block}}


def test_planted_update_is_the_promised_rank_k_matrix():
    params = params_tree(jax.random.key(0))
    cfg = LoraConfig(r=3, alpha=6.0, target_modules=("c_attn", "mlp.c_proj"))
    teacher, planted = plant_low_rank(jax.random.key(1), params, cfg, scale=2.0)
    for path, adapter in flatten_adapters(planted).items():
        block, kind = path.split(".")[1], path.split(".")[2:]
        before = np.asarray(params["h"][block][kind[0]][kind[1]]["kernel"], np.float64)
        after = np.asarray(teacher["h"][block][kind[0]][kind[1]]["kernel"], np.float64)
        dw = cfg.scaling_for(path) * np.asarray(adapter["B"], np.float64) @ np.asarray(adapter["A"], np.float64)
        np.testing.assert_allclose(after - before, dw.T, atol=1e-6)  # the teacher is W + dW, in kernel layout
        s = np.linalg.svd(dw, compute_uv=False)
        top = 2.0 * np.linalg.norm(before.T, 2)
        np.testing.assert_allclose(s[:3], top * np.linspace(1.0, 0.5, 3), rtol=1e-4)
        assert s[3] < 1e-5 * s[0]  # rank exactly 3
        if kind == ["attn", "c_attn"]:  # fed by ln_1: nothing planted along 1 / gamma, which no input reaches
            blind = 1.0 / np.asarray(params["h"]["0"]["ln_1"]["scale"], np.float64)
            assert np.linalg.norm(dw @ blind) < 1e-5 * np.linalg.norm(dw) * np.linalg.norm(blind)
    assert teacher["h"]["0"]["attn"]["c_attn"]["bias"] is params["h"]["0"]["attn"]["c_attn"]["bias"]


def test_subspaces_of_both_sides():
    key_u, key_v, key_w = jax.random.split(jax.random.key(0), 3)
    u = jnp.linalg.qr(jax.random.normal(key_u, (12, 4)))[0]  # shared left vectors
    v = jnp.linalg.qr(jax.random.normal(key_v, (10, 4)))[0]
    w = jnp.linalg.qr(jnp.concatenate([v, jax.random.normal(key_w, (10, 2))], axis=1))[0][:, 4:]  # orthogonal to v
    first = {"A": (v * jnp.array([3.0, 2.0, 1.5, 1.0])).T, "B": u}
    second = {"A": w.T, "B": u[:, :2] * 2.0}  # same output directions, input directions orthogonal to first's
    phi = delta_subspaces(first, 1.0, second, 0.5)
    assert phi["row"].shape == phi["column"].shape == (4, 2)
    np.testing.assert_allclose(phi["row"], 0.0, atol=1e-5)
    assert phi["column"][3, 1] == pytest.approx(1.0, abs=1e-5)  # its 2 output directions lie in first's 4
    same = delta_subspaces(first, 1.0, first, 1.0)
    np.testing.assert_allclose(np.diag(same["row"]), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.diag(same["column"]), 1.0, atol=1e-5)


def test_compare_to_planted_reads_each_module():
    params = params_tree(jax.random.key(0))
    planted_cfg = LoraConfig(r=2, alpha=2.0, target_modules=("c_attn", "mlp.c_proj"))
    _, planted = plant_low_rank(jax.random.key(1), params, planted_cfg, scale=1.0)
    # a student of rank 4 holding exactly the planted update (scaled into its own alpha / r = 2)
    cfg = LoraConfig(r=4, alpha=8.0, target_modules=("c_attn", "mlp.c_proj"))
    student = {}
    for path, a in flatten_adapters(planted).items():
        pad = 1e-4 * jax.random.normal(jax.random.key(2), (2, a["A"].shape[1]))  # small extra directions
        student[path] = {"A": jnp.concatenate([a["A"], pad]), "B": jnp.pad(a["B"], ((0, 0), (0, 2))) / 2.0}
    out = compare_to_planted(with_scaling(unflatten_adapters(student), cfg), planted)
    assert sorted(out["modules"]) == ["h.0.attn.c_attn", "h.0.mlp.c_proj"]
    for name in ("phi_row", "phi_column", "energy_top_k"):
        assert out[name] == pytest.approx(1.0, abs=1e-4)
        assert out[name] == pytest.approx(np.mean([m[name] for m in out["modules"].values()]))


def test_harmonic_spectrum():
    params = params_tree(jax.random.key(0))
    cfg = LoraConfig(r=4, alpha=4.0, target_modules=("mlp.c_proj",))
    teacher, planted = plant_low_rank(jax.random.key(1), params, cfg, scale=1.5, spectrum="harmonic")
    adapter = flatten_adapters(planted)["h.0.mlp.c_proj"]
    s = np.linalg.svd(np.asarray(adapter["B"] @ adapter["A"], np.float64), compute_uv=False)
    top = 1.5 * np.linalg.norm(np.asarray(params["h"]["0"]["mlp"]["c_proj"]["kernel"], np.float64), 2)
    np.testing.assert_allclose(s[:4], top / np.arange(1, 5), rtol=1e-4)
    with pytest.raises(ConfigError, match="unknown planted spectrum 'flat'; valid: linear, harmonic"):
        plant_low_rank(jax.random.key(1), params, cfg, scale=1.0, spectrum="flat")


def test_teacher_rows_are_samples_of_the_teacher():
    config = GPT2Config(vocab_size=11, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    model, params = GPT2(config), sharpen(init_params(jax.random.key(0), config), 30.0)
    assert np.allclose(params["ln_f"]["scale"], 30.0 * init_params(jax.random.key(0), config)["ln_f"]["scale"])
    rows = teacher_rows(jax.random.key(1), model, params, 1000, 8, chunk=64)
    assert rows.input_ids.shape == rows.targets.shape == (1000, 8) and rows.loss_mask.min() == 1.0
    fewer = teacher_rows(jax.random.key(1), model, params, 100, 8, chunk=64)
    assert np.array_equal(fewer.input_ids, rows.input_ids[:100]) and np.array_equal(fewer.targets, rows.targets[:100])
    # each target is a draw from the teacher's distribution at its position: its mean log-probability is
    # minus the mean entropy (argmax targets would score higher, uniform ones lower)
    log_p = np.asarray(jax.nn.log_softmax(model.apply({"params": params}, rows.input_ids)), np.float64)
    entropy = -np.sum(np.exp(log_p) * log_p, axis=-1).mean()
    drawn = np.take_along_axis(log_p, rows.targets[..., None], axis=-1).mean()
    assert np.log(11) - entropy > 0.3  # sharpened: far from uniform
    assert abs(drawn + entropy) < 0.05, (drawn, entropy)
