"""DoRA: the factored column norm, the layer's output and its merge, against dense numpy float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.core.lora.adapter import flatten_adapters
from jlora.core.lora.dora import column_norm, dora_output
from jlora.core.models.gpt2 import Linear

RNG = np.random.default_rng(0)
D_IN, D_OUT, R = 24, 40, 3


def dense_norm(kernel, a, b, s):
    """||W_j + s (B A)_j|| with W = kernel.T, the (d_out, d_in) matrix formed, in float64."""
    w = np.asarray(kernel, np.float64).T + s * np.asarray(b, np.float64) @ np.asarray(a, np.float64)
    return np.linalg.norm(w, axis=1)


def test_column_norm_without_the_dense_matrix():
    kernel, a, b = RNG.normal(size=(D_IN, D_OUT)), RNG.normal(size=(R, D_IN)), RNG.normal(size=(D_OUT, R))
    got = column_norm(jnp.float32(kernel), jnp.float32(a), jnp.float32(b), 1.7)
    np.testing.assert_allclose(got, dense_norm(kernel, a, b, 1.7), rtol=2e-5)
    np.testing.assert_allclose(
        column_norm(jnp.float32(kernel), jnp.float32(a), jnp.zeros((D_OUT, R)), 1.7),
        np.linalg.norm(kernel, axis=0),  # B = 0: ||W_j||, the magnitude's initial value
        rtol=1e-6,
    )


@pytest.mark.parametrize("dropout", [False, True])
def test_output_is_pefts_formula(dropout):
    """No dropout: (m/n) (x W^T + s x A^T B^T) + b; dropout: x W^T + b + (m/n - 1) x_d W^T + (m/n) s x_d A^T B^T."""
    x, kernel, bias = RNG.normal(size=(2, 5, D_IN)), RNG.normal(size=(D_IN, D_OUT)), RNG.normal(size=D_OUT)
    a, b, m = RNG.normal(size=(R, D_IN)), RNG.normal(size=(D_OUT, R)), RNG.uniform(1, 2, size=D_OUT)
    s = 0.5
    g = m / dense_norm(kernel, a, b, s)
    x_d = x * RNG.integers(0, 2, size=x.shape) * 2.0  # a dropout mask at rate 0.5, kept values scaled by 2
    if dropout:
        expected = x @ kernel + bias + (g - 1) * (x_d @ kernel) + g * s * (x_d @ a.T @ b.T)
    else:
        expected = g * (x @ kernel + s * (x @ a.T @ b.T)) + bias
    f32 = jnp.float32
    x_in = f32(x_d) if dropout else f32(x)
    delta = jlora.lora_delta(x_in, f32(a), f32(b), s)
    adapter = {"A": f32(a), "B": f32(b), "m": f32(m)}
    got = dora_output(f32(x) @ f32(kernel), delta, f32(kernel), adapter, s, f32(x_d) if dropout else None) + bias
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_linear_layer_and_gradients_to_m_a_b_only_through_the_lora_path():
    kernel, bias = RNG.normal(size=(D_IN, D_OUT)), RNG.normal(size=D_OUT)
    a, b, m = RNG.normal(size=(R, D_IN)), RNG.normal(size=(D_OUT, R)), RNG.uniform(1, 2, size=D_OUT)
    x = RNG.normal(size=(4, D_IN))
    cfg = jlora.LoraConfig(r=R, alpha=2.0 * R, use_dora=True)
    layer = Linear(D_OUT, jnp.float32, jnp.float32, lora_dropout=cfg.dropout, name="c_fc")
    params = {"kernel": jnp.float32(kernel), "bias": jnp.float32(bias)}
    out = lambda ad: layer.apply({"params": params, "lora": ad}, jnp.float32(x))  # noqa: E731
    adapter = {"A": jnp.float32(a), "B": jnp.float32(b), "m": jnp.float32(m), "scaling": jlora.scaling(cfg)}
    n = dense_norm(kernel, a, b, 2.0)
    direction = x @ kernel + 2.0 * (x @ a.T @ b.T)  # (W + s B A) x, in rows
    np.testing.assert_allclose(out(adapter), m / n * direction + bias, rtol=1e-4, atol=1e-4)
    # n is a constant for the gradient (DoRA section 4.3): d sum(out) / dB = s (m / n) (x A^T) summed over rows,
    # d sum(out) / dm = sum over rows of (W + s B A) x / n.
    grads = jax.grad(lambda ad: jnp.sum(out(ad)))(adapter)
    np.testing.assert_allclose(grads["B"], 2.0 * np.outer(m / n, (x @ a.T).sum(0)), rtol=1e-4)
    np.testing.assert_allclose(grads["m"], direction.sum(0) / n, rtol=1e-4)


def test_init_is_the_base_model_and_merge_equals_the_trained_one(tiny_hf, random_b):
    cfg = jlora.LoraConfig(r=4, alpha=8, target_modules=("c_attn", "mlp.c_fc"), use_dora=True)
    model, params = jlora.load_gpt2(tiny_hf[0], lora=cfg)
    lora = jlora.init_lora(jax.random.key(0), cfg, params)
    for path, adapter in flatten_adapters(lora).items():  # m = ||W_j||, the norms of the output features
        kernel = np.asarray(jlora.tree.get_path(params, path)["kernel"], np.float64)
        np.testing.assert_allclose(adapter["m"], np.linalg.norm(kernel, axis=0), rtol=1e-6)
    ids = np.asarray(jax.random.randint(jax.random.key(2), (2, 12), 0, 101))
    apply = jax.jit(model.apply)
    base = apply({"params": params}, ids)
    np.testing.assert_allclose(apply({"params": params, "lora": lora}, ids), base, atol=1e-5, rtol=0)

    lora = random_b(lora, scale=0.3)
    lora = jax.tree_util.tree_map_with_path(lambda p, x: x * 1.3 if p[-1].key == "m" else x, lora)  # m trained too
    adapted = apply({"params": params, "lora": lora}, ids)
    assert float(jnp.abs(adapted - base).max()) > 1e-1
    merged = jlora.merge(params, lora)
    np.testing.assert_allclose(apply({"params": merged}, ids), adapted, atol=1e-5, rtol=0)
    kernel = np.asarray(params["h"]["1"]["mlp"]["c_fc"]["kernel"], np.float64)
    ad = flatten_adapters(lora)["h.1.mlp.c_fc"]
    a, b, m = (np.asarray(ad[k], np.float64) for k in "ABm")
    expected = (kernel + 2.0 * (b @ a).T) * (m / dense_norm(kernel, a, b, 2.0))[None, :]  # m (W + dW) / ||W + dW||
    np.testing.assert_allclose(merged["h"]["1"]["mlp"]["c_fc"]["kernel"], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cannot undo a DoRA merge"):
        jlora.unmerge(merged, lora)
