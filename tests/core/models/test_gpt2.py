"""The Flax GPT-2 against transformers' PyTorch GPT2LMHeadModel on the same checkpoint."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jlora
from jlora.core.models.gpt2 import GPT2Config, init_std, random_params
from jlora.tree import leaves_by_path


def torch_logits(model, ids, mask=None):
    with torch.no_grad():
        out = model(
            torch.tensor(np.asarray(ids)), attention_mask=None if mask is None else torch.tensor(np.asarray(mask))
        )
    return out.logits.numpy()


def random_ids(key, shape, vocab):
    return np.asarray(jax.random.randint(jax.random.key(key), shape, 0, vocab))


@pytest.mark.parametrize("fixture", ["tiny_hf", "small_hf"])
def test_logits_match_transformers(fixture, request):
    directory, reference = request.getfixturevalue(fixture)
    model, params = jlora.load_gpt2(directory)
    ids = random_ids(0, (2, 16), model.config.vocab_size)
    logits = np.asarray(jax.jit(model.apply)({"params": params}, ids))
    assert logits.shape == (2, 16, model.config.vocab_size)
    np.testing.assert_allclose(logits, torch_logits(reference, ids), atol=1e-4, rtol=0)


def test_padded_batch_matches_transformers(tiny_hf):
    directory, reference = tiny_hf
    model, params = jlora.load_gpt2(directory)
    ids = random_ids(1, (3, 12), model.config.vocab_size)
    mask = np.ones((3, 12), np.int32)
    mask[1, 7:] = 0  # right padding
    mask[2, 3:] = 0
    logits = np.asarray(model.apply({"params": params}, ids, attention_mask=mask))
    expected = torch_logits(reference, ids, mask)
    real = mask.astype(bool)  # padded positions' outputs are undefined in both
    np.testing.assert_allclose(logits[real], expected[real], atol=1e-4, rtol=0)
    # Causal attention: right padding changes no real token's logits, mask or not.
    np.testing.assert_allclose(np.asarray(model.apply({"params": params}, ids))[real], logits[real], atol=1e-5)


def test_param_tree_is_the_checkpoint_tree(tiny_hf):
    _, params = jlora.load_gpt2(tiny_hf[0])
    assert sorted(params) == ["h", "ln_f", "wpe", "wte"]
    assert sorted(params["h"]) == ["0", "1"]
    block = jax.tree.map(jnp.shape, params["h"]["0"])
    assert block == {
        "ln_1": {"scale": (32,), "bias": (32,)},
        "attn": {"c_attn": {"kernel": (32, 96), "bias": (96,)}, "c_proj": {"kernel": (32, 32), "bias": (32,)}},
        "ln_2": {"scale": (32,), "bias": (32,)},
        "mlp": {"c_fc": {"kernel": (32, 128), "bias": (128,)}, "c_proj": {"kernel": (128, 32), "bias": (32,)}},
    }


def test_bfloat16_compute_stays_close(tiny_hf):
    directory, reference = tiny_hf
    model, params = jlora.load_gpt2(directory, dtype="bfloat16", param_dtype="bfloat16")
    assert jax.tree.leaves(params)[0].dtype == jnp.bfloat16
    ids = random_ids(2, (2, 8), model.config.vocab_size)
    logits = model.apply({"params": params}, ids)
    assert logits.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(logits, np.float32), torch_logits(reference, ids), atol=5e-2)


def test_random_init_shapes_match_loaded_checkpoint(tiny_hf):
    _, params = jlora.load_gpt2(tiny_hf[0])
    config = GPT2Config(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    fresh = jlora.init_params(jax.random.key(0), config)
    assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, params)


def test_remat_gives_the_same_logits(tiny_hf):
    ids = random_ids(3, (1, 8), 101)
    model, params = jlora.load_gpt2(tiny_hf[0])
    remat_model, _ = jlora.load_gpt2(tiny_hf[0], remat=True)
    np.testing.assert_array_equal(model.apply({"params": params}, ids), remat_model.apply({"params": params}, ids))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="n_head=5"):
        GPT2Config(n_embd=32, n_head=5)
    with pytest.raises(ValueError, match="float64"):
        GPT2Config(dtype="float64")


def test_attention_asks_for_the_fused_kernel_on_a_gpu_and_falls_back(monkeypatch):
    """The GPU path, on a CPU: bfloat16 and no mask ask for cuDNN; refused here, XLA computes the same."""
    from jlora.core.models.decoder import causal_attention

    xla = jax.nn.dot_product_attention
    asked = []

    def recording(*args, implementation=None, **kwargs):
        asked.append(implementation)
        return xla(*args, implementation=implementation, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 5, 2, 8), jnp.bfloat16) for i in range(3))
    mask = jnp.ones((2, 1, 5, 5), bool)
    expected = xla(q, k, v, scale=0.3, is_causal=True, implementation="xla")
    for backend, args, implementations in [
        ("gpu", (q, k, v, None), ["cudnn", "xla"]),  # cuDNN is not on this machine: refused at trace time
        ("gpu", (q, k, v, mask), ["xla"]),  # packed rows need a mask, which JAX's cuDNN path cannot take
        ("gpu", (q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), None), ["xla"]),  # float32
        ("cpu", (q, k, v, None), ["xla"]),
    ]:
        monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
        asked.clear()
        out = causal_attention(*args, 0.3, None)
        assert asked == implementations
        np.testing.assert_allclose(np.float32(out), np.float32(expected), atol=1e-2)


def test_random_params_draw_init_params_distribution_the_same_everywhere():
    """numpy's draws: GPT-2's initialisation leaf for leaf (constants exactly, normals by their std), fixed bits."""
    config = GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    ours, flax_init = (
        leaves_by_path(random_params(3, config)),
        leaves_by_path(jlora.init_params(jax.random.key(3), config)),
    )
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in flax_init.items()}
    for path, x in ours.items():
        std = init_std(path, config)
        if std is None:  # biases and LayerNorm shifts 0, LayerNorm scales 1: exactly what Flax gives
            np.testing.assert_array_equal(x, flax_init[path])
        else:  # 2,048 or more draws each: the sample std within 10 % of the initialiser's, as Flax's is
            assert abs(float(np.std(x)) / std - 1) < 0.1 and abs(float(np.std(flax_init[path])) / std - 1) < 0.1, path
    assert init_std("h.1.mlp.c_proj.kernel", config) == 0.02 / 2  # 1 / sqrt(2 n_layer)
    again, other = leaves_by_path(random_params(3, config)), leaves_by_path(random_params(4, config))
    assert all(np.array_equal(again[k], v) for k, v in ours.items())
    assert not np.array_equal(other["wte.embedding"], ours["wte.embedding"])


def test_init_params_compiles_once_per_config():
    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    before = jlora.init_params._cache_size()
    a = jlora.init_params(jax.random.key(0), config)
    b = jlora.init_params(jax.random.key(1), config)
    assert jlora.init_params._cache_size() == before + 1
    assert not np.array_equal(a["wte"]["embedding"], b["wte"]["embedding"])
