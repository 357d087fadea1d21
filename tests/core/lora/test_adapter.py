"""The LoRA tree (layout, initialisation, targets) and the adapted model's forward pass."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.core.lora.adapter import flatten_adapters, output_columns
from jlora.core.models.gpt2 import GPT2, GPT2Config, Linear, param_shapes

TINY = GPT2Config(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4, embd_pdrop=0.0, resid_pdrop=0.0)


@pytest.fixture(scope="module")
def tiny_params():
    return jlora.init_params(jax.random.key(0), TINY)


def ids(batch=2, length=8):
    return jax.random.randint(jax.random.key(7), (batch, length), 0, TINY.vocab_size)


def test_gpt2_small_default_tree_and_count():
    cfg = jlora.LoraConfig()
    shapes = jax.eval_shape(lambda p: jlora.init_lora(jax.random.key(0), cfg, p), param_shapes(GPT2Config()))
    expected = {"h": {str(i): {"attn": {"c_attn": {"A": (8, 768), "B": (2304, 8), "scaling": ()}}} for i in range(12)}}
    assert jax.tree.map(lambda x: x.shape, shapes) == expected  # each adapter: its factors and its scale
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(jlora.without_scaling(shapes))) == 294_912
    assert jlora.lora_param_count(shapes) == 294_912  # the scales are not parameters
    # one layer's share, counted from the tree: the source document's 6,144 + 18,432 = 24,576
    assert jlora.module_counts(shapes)["h.3.attn.c_attn"] == {"A": 6_144, "B": 18_432, "lora": 24_576}


def test_adapted_model_equals_base_at_init(random_b, tiny_params):
    model = GPT2(TINY, jlora.LoraConfig(r=4, alpha=8, target_modules=("c_attn", "c_proj", "c_fc")))
    lora = jlora.init_lora(jax.random.key(1), model, tiny_params)
    assert set(flatten_adapters(lora)) == {
        f"h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    base = model.apply({"params": tiny_params}, ids())
    adapted = model.apply({"params": tiny_params, "lora": lora}, ids())
    np.testing.assert_array_equal(adapted, base)
    assert not np.array_equal(model.apply({"params": tiny_params, "lora": random_b(lora)}, ids()), base)


def test_linear_adds_scaled_low_rank_update():
    rng = np.random.default_rng(0)
    x, w, bias = rng.normal(size=(3, 5, 6)), rng.normal(size=(6, 9)), rng.normal(size=9)
    a, b = rng.normal(size=(2, 6)), rng.normal(size=(9, 2))
    cfg = jlora.LoraConfig(r=2, alpha=3.0)
    layer = Linear(9, jnp.float32, jnp.float32, name="c_fc")
    variables = {"params": {"kernel": w, "bias": bias}, "lora": {"A": a, "B": b, "scaling": jlora.scaling(cfg)}}
    out = layer.apply(jax.tree.map(jnp.float32, variables), jnp.float32(x))
    expected = x @ w + bias + 1.5 * x @ a.T @ b.T  # W x + (alpha / r) B A x, in rows
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_qv_slices_touch_only_their_columns(random_b, tiny_params):
    cfg = jlora.LoraConfig(r=2, alpha=4, target_modules=("c_attn.q", "c_attn.v"))
    lora = jlora.init_lora(jax.random.key(0), cfg, tiny_params)
    c_attn = lora["h"]["0"]["attn"]["c_attn"]
    one = {"A": (2, 32), "B": (32, 2), "scaling": ()}
    assert jax.tree.map(jnp.shape, c_attn) == {"q": one, "v": one}
    layer = Linear(96, jnp.float32, jnp.float32)
    x = jax.random.normal(jax.random.key(3), (4, 32))
    kernel = tiny_params["h"]["0"]["attn"]["c_attn"]
    base = layer.apply({"params": kernel}, x)
    delta = layer.apply({"params": kernel, "lora": random_b(c_attn)}, x) - base
    k_cols = output_columns("h.0.attn.c_attn.k", 96)
    assert np.all(np.asarray(delta[:, k_cols]) == 0)
    assert np.all(np.abs(np.asarray(delta[:, output_columns("h.0.attn.c_attn.q", 96)])) > 0)


@pytest.mark.parametrize(
    ("targets", "layers", "expected"),
    [
        (("c_proj",), None, ["h.0.attn.c_proj", "h.0.mlp.c_proj", "h.1.attn.c_proj", "h.1.mlp.c_proj"]),
        (("mlp.c_proj",), (1,), ["h.1.mlp.c_proj"]),
        ((r"h\.1\.attn\.c_(attn|proj)",), None, ["h.1.attn.c_attn", "h.1.attn.c_proj"]),
        (("c_attn.v",), (0,), ["h.0.attn.c_attn.v"]),
    ],
)
def test_target_selection(targets, layers, expected):
    assert list(jlora.LoraConfig(target_modules=targets, layers=layers).module_paths(2)) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(r=0), "r=0"),
        (dict(r=2.5), "r=2.5"),
        (dict(alpha=-1), "alpha=-1"),
        (dict(dropout=1.0), r"dropout=1.0"),
        (dict(init="orthogonal"), "unknown LoRA init 'orthogonal'; valid: kaiming, gaussian, zeros"),
    ],
)
def test_config_errors_name_the_bad_value(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        jlora.LoraConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_config_errors_at_use():
    with pytest.raises(ValueError, match="unknown LoRA target 'q_proj'; valid: attn.c_attn") as info:
        jlora.LoraConfig(target_modules=("q_proj",)).module_paths(2)  # a Llama module: not a GPT-2 target
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"layers \[5\] out of range; valid: 0..1"):
        jlora.LoraConfig(layers=(5,)).module_paths(2)
    with pytest.raises(ValueError, match="overlap"):
        jlora.LoraConfig(target_modules=("c_attn", "c_attn.q")).module_paths(2)


@pytest.mark.parametrize("init", ["kaiming", "gaussian", "zeros"])
def test_initialisation_distributions(init):
    params = {"h": {"0": {"mlp": {"c_fc": {"kernel": jnp.zeros((1024, 64))}}}}}
    cfg = jlora.LoraConfig(r=16, alpha=16, target_modules=("c_fc",), init=init)
    adapter = flatten_adapters(jlora.init_lora(jax.random.key(0), cfg, params))["h.0.mlp.c_fc"]
    a = np.asarray(adapter["A"])
    assert a.shape == (16, 1024) and not np.any(adapter["B"])
    if init == "kaiming":  # U(-1/sqrt(d_in), 1/sqrt(d_in)), torch's kaiming_uniform_(a=sqrt(5))
        bound = 1 / math.sqrt(1024)
        assert np.abs(a).max() <= bound and np.std(a) == pytest.approx(bound / math.sqrt(3), rel=0.03)
    elif init == "gaussian":
        assert np.std(a) == pytest.approx(1 / 16, rel=0.03) and abs(np.mean(a)) < 0.003
    else:
        assert not np.any(a)


def test_rank_and_alpha_patterns():
    cfg = jlora.LoraConfig(r=8, alpha=16, rank_pattern={"h.1.attn.c_attn": 4}, alpha_pattern={"c_attn": 2})
    assert cfg.rank_for("h.1.attn.c_attn") == 4 and cfg.rank_for("h.0.attn.c_attn") == 8
    assert cfg.scaling_for("h.1.attn.c_attn") == 0.5 and cfg.scaling_for("h.0.attn.c_attn") == 0.25
    assert jlora.LoraConfig(r=16, alpha=8, rslora=True).scaling_for("h.0.attn.c_attn") == 2.0
    lora = jlora.init_lora(jax.random.key(0), cfg, jlora.init_params(jax.random.key(0), TINY))
    assert lora["h"]["1"]["attn"]["c_attn"]["A"].shape == (4, 32)
    assert jlora.LoraConfig.from_dict(cfg.to_dict()) == cfg


def test_lora_dropout_acts_only_in_training(random_b, tiny_params):
    model = GPT2(TINY, jlora.LoraConfig(r=4, alpha=8, dropout=0.5))
    lora = random_b(jlora.init_lora(jax.random.key(1), model, tiny_params))
    variables = {"params": tiny_params, "lora": lora}
    eval_out = model.apply(variables, ids())
    np.testing.assert_array_equal(model.apply(variables, ids(), deterministic=True), eval_out)
    train = model.apply(variables, ids(), deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(train, eval_out)
    with pytest.raises(Exception, match="dropout"):
        model.apply(variables, ids(), deterministic=False)
    # Dropout is on the LoRA path only: with B = 0 training mode is the base model.
    zero_b = {"params": tiny_params, "lora": jlora.init_lora(jax.random.key(1), model, tiny_params)}
    train_zero = model.apply(zero_b, ids(), deterministic=False, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(train_zero, model.apply({"params": tiny_params}, ids()))


def test_the_adapter_carries_its_scale_and_no_config_is_read_after_it_is_built(random_b, tiny_params):
    """The update is the stored scale times B A: scaling the stored scale scales the update by exactly that
    factor, and a model whose config says another alpha, or that has no config, gives the same output."""
    cfg = jlora.LoraConfig(r=4, alpha=8, target_modules=("c_attn", "c_fc"))
    lora = random_b(jlora.init_lora(jax.random.key(0), cfg, tiny_params), scale=0.5)
    assert {float(a["scaling"]) for a in flatten_adapters(lora).values()} == {2.0}
    base = GPT2(TINY).apply({"params": tiny_params}, ids(), method=GPT2.hidden)

    def update(model, tree):
        return np.asarray(model.apply({"params": tiny_params, "lora": tree}, ids(), method=GPT2.hidden) - base)

    layer = Linear(96, dtype=jnp.float32, param_dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(3), (5, 32))
    c_attn = {"params": tiny_params["h"]["0"]["attn"]["c_attn"], "lora": lora["h"]["0"]["attn"]["c_attn"]}
    tripled = {**c_attn, "lora": {**c_attn["lora"], "scaling": 3 * c_attn["lora"]["scaling"]}}
    delta, delta3 = (layer.apply(v, x) - layer.apply({"params": c_attn["params"]}, x) for v in (c_attn, tripled))
    np.testing.assert_allclose(delta3, 3 * delta, rtol=1e-5, atol=1e-7)  # one layer: exactly the factor
    own = update(GPT2(TINY, cfg), lora)
    assert np.abs(own).max() > 1e-3
    np.testing.assert_array_equal(update(GPT2(TINY, cfg.replace(alpha=64.0)), lora), own)  # alpha read from nowhere
    np.testing.assert_array_equal(update(GPT2(TINY), lora), own)  # no config at all: the adapters are enough
    with pytest.raises(ValueError, match=r"adapter at h\.0\.attn\.c_attn carries no scale"):
        GPT2(TINY).apply({"params": tiny_params, "lora": jlora.without_scaling(lora)}, ids())
