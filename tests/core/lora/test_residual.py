"""PiSSA and OLoRA: factors against numpy float64, the unchanged model at step 0, the rank-2r conversion."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.core.lora.adapter import flatten_adapters
from jlora.core.lora.residual import as_plain_lora, init_adapters, olora_factors, pissa_factors, randomized_svd
from jlora.core.models.gpt2 import GPT2, GPT2Config
from jlora.errors import ConfigError

TINY = GPT2Config(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4, embd_pdrop=0.0, resid_pdrop=0.0)
W = np.random.default_rng(0).normal(size=(48, 20))  # (d_out, d_in)
# One compiled forward for the r=4, alpha=8 adapters: the model's LoraConfig gives only their scaling.
APPLY = jax.jit(GPT2(TINY, jlora.LoraConfig(r=4, alpha=8)).apply)
IDS = np.asarray(jax.random.randint(jax.random.key(7), (2, 16), 0, 101))


@pytest.fixture(scope="module")
def params():
    return jlora.init_params(jax.random.key(0), TINY)


def test_pissa_is_the_best_rank_r_part_of_w():
    a, b = pissa_factors(jnp.float32(W), 4, scaling=2.0)
    u, s, vt = np.linalg.svd(W, full_matrices=False)
    np.testing.assert_allclose(2.0 * np.asarray(b, np.float64) @ np.asarray(a), (u[:, :4] * s[:4]) @ vt[:4], atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), np.sqrt(s[:4] / 2.0), rtol=1e-5)  # sqrt(S/s) on each side
    np.testing.assert_allclose(np.linalg.norm(b, axis=0), np.sqrt(s[:4] / 2.0), rtol=1e-5)


def test_randomized_svd_finds_the_top_of_a_decaying_spectrum():
    rng = np.random.default_rng(1)
    u, _ = np.linalg.qr(rng.normal(size=(60, 30)))
    v, _ = np.linalg.qr(rng.normal(size=(30, 30)))
    w = (u * 0.5 ** np.arange(30)) @ v.T
    _, s, _ = randomized_svd(jnp.float32(w), 3, 4, jax.random.key(0))
    np.testing.assert_allclose(s, [1.0, 0.5, 0.25], rtol=1e-4)
    _, s_wide, _ = randomized_svd(jnp.float32(w.T), 3, 4, jax.random.key(0))  # (m < n): through the transpose
    np.testing.assert_allclose(s_wide, [1.0, 0.5, 0.25], rtol=1e-4)


def test_olora_is_the_qr_of_w():
    a, b = olora_factors(jnp.float32(W), 5)
    q, r = np.linalg.qr(W)
    np.testing.assert_allclose(np.asarray(b, np.float64) @ np.asarray(a), q[:, :5] @ r[:5], atol=1e-4)  # sign-free
    np.testing.assert_allclose(np.asarray(b).T @ np.asarray(b), np.eye(5), atol=1e-5)


@pytest.mark.parametrize(
    ("init", "use_dora"), [("pissa", False), ("pissa_niter_2", True), ("olora", False), ("olora", True)]
)
def test_step_zero_is_the_base_model(params, init, use_dora):
    cfg = jlora.LoraConfig(r=4, alpha=8, init=init, use_dora=use_dora, target_modules=("c_attn", "mlp.c_proj"))
    residual, lora = jlora.init_adapters(jax.random.key(1), cfg, params)
    base = APPLY({"params": params}, IDS)
    np.testing.assert_allclose(APPLY({"params": residual, "lora": lora}, IDS), base, atol=1e-5, rtol=0)
    assert float(jnp.abs(APPLY({"params": residual}, IDS) - base).max()) > 1e-2  # the base really is a residual
    kernel, w = residual["h"]["0"]["mlp"]["c_proj"]["kernel"], params["h"]["0"]["mlp"]["c_proj"]["kernel"]
    ad = flatten_adapters(lora)["h.0.mlp.c_proj"]  # a wide weight (32 x 128): the SVD of its transpose
    np.testing.assert_allclose(kernel + 2.0 * (ad["B"] @ ad["A"]).T, w, atol=1e-5)  # W_res = W - s B0 A0


def test_q_v_slices_and_the_rank_2r_conversion(params, random_b):
    cfg = jlora.LoraConfig(
        r=2, alpha=2 * np.sqrt(2), init="pissa", target_modules=("c_attn.q", "c_attn.v"), rslora=True
    )
    residual, init = jlora.init_adapters(jax.random.key(1), cfg, params)
    trained = random_b(init, scale=0.05)  # as if trained
    plain, plain_cfg = as_plain_lora(trained, init, cfg)
    assert (plain_cfg.r, plain_cfg.init, plain_cfg.alpha) == (4, "kaiming", pytest.approx(4.0))
    assert plain_cfg.scaling_for("h.0.attn.c_attn.q") == pytest.approx(cfg.scaling_for("h.0.attn.c_attn.q")) == 2.0
    assert plain["h"]["1"]["attn"]["c_attn"]["v"]["A"].shape == (4, 32)
    on_residual = jax.jit(GPT2(TINY, cfg).apply)({"params": residual, "lora": trained}, IDS)
    on_base = jax.jit(GPT2(TINY, plain_cfg).apply)({"params": params, "lora": plain}, IDS)
    np.testing.assert_allclose(on_base, on_residual, atol=1e-5, rtol=0)


def test_given_factors_rebuild_the_same_residual(params):
    cfg = jlora.LoraConfig(r=3, alpha=3, init="pissa_niter_1")
    residual, lora = jlora.init_adapters(jax.random.key(4), cfg, params)
    again, lora_again = init_adapters(jax.random.key(99), cfg, params, init=lora)  # another key: the factors win
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), (again, lora_again), (residual, lora)))


def test_errors_are_one_line(params):
    with pytest.raises(ConfigError, match=r"needs r <= min\(d_out, d_in\) = 32 at h.0.attn.c_attn, got r=40"):
        jlora.init_adapters(jax.random.key(0), jlora.LoraConfig(r=40, alpha=8, init="olora"), params)
    with pytest.raises(ConfigError, match="use\\s+jlora.init_adapters"):
        jlora.init_lora(jax.random.key(0), jlora.LoraConfig(init="pissa"), params)
    with pytest.raises(ConfigError, match="unknown LoRA init 'pissa_niter_x'; valid: .*pissa_niter_<K>, olora"):
        jlora.LoraConfig(init="pissa_niter_x")
    with pytest.raises(ConfigError, match=r"use_dora with q/k/v slice targets \['c_attn.q'\]") as info:
        jlora.LoraConfig(use_dora=True, target_modules=("c_attn.q", "c_fc"))
    assert "\n" not in str(info.value)
