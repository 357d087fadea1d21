"""Mixed-adapter batches: each row equals its own adapter alone, per-adapter losses, one compile per stack shape."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.core.algebra.mixed import check_index, make_mixed_eval_step, mixed_variables, stack_adapters
from jlora.core.lora.adapter import map_factors
from jlora.core.update.loss import loss_sums
from jlora.errors import CheckpointError, ConfigError

CONFIG = jlora.GPT2Config(vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=4)
CONFIGS = [  # ranks, alphas, rsLoRA, slices and module sets that differ
    jlora.LoraConfig(r=4, alpha=8, target_modules=("c_attn", "mlp.c_proj")),
    jlora.LoraConfig(r=2, alpha=6, rslora=True, target_modules=("c_attn", "c_fc")),
    jlora.LoraConfig(r=8, alpha=4, target_modules=("c_attn",), layers=(1,)),
]
IDS = np.random.default_rng(0).integers(0, 101, size=(5, 12))
INDEX = np.array([2, 0, -1, 1, 0])  # row 2: the base alone


@pytest.fixture(scope="module")
def setup(random_b):
    params = jlora.init_params(jax.random.key(0), CONFIG)
    adapters = [
        (cfg, random_b(jlora.init_lora(jax.random.key(k), cfg, params), seed=k, scale=0.5))
        for k, cfg in enumerate(CONFIGS)
    ]
    return jlora.GPT2(CONFIG, jlora.LoraConfig()), params, adapters


def trees(pairs):
    """The adapter trees of (config, tree) pairs: what stack_adapters takes."""
    return [lora for _, lora in pairs]


def alone(model, params, adapter, ids):
    """Logits of `ids` with one adapter (None: the base), the ordinary single-adapter path."""
    if adapter is None:
        return jax.jit(model.apply)({"params": params}, ids)
    cfg, lora = adapter
    return jax.jit(model.clone(lora=cfg).apply)({"params": params, "lora": lora}, ids)


def test_each_row_equals_its_adapter_alone(setup):
    model, params, adapters = setup
    stack = stack_adapters(trees(adapters))
    assert stack.size == 3 and stack.lora["h"]["1"]["attn"]["c_attn"]["A"].shape == (3, 8, 32)
    assert (stack.lora["h"]["0"]["attn"]["c_attn"]["A"][2] == 0).all()  # adapter 2 adapts block 1 only
    mixed = np.asarray(jax.jit(model.apply)(mixed_variables(params, stack, INDEX), IDS))
    for k in (0, 1, 2, -1):
        rows = INDEX == k
        expected = alone(model, params, None if k < 0 else adapters[k], IDS[rows])
        np.testing.assert_allclose(mixed[rows], expected, atol=2e-5, rtol=0)
    assert np.abs(mixed[1] - np.asarray(alone(model, params, None, IDS[1:2])[0])).max() > 1e-2  # adapters count


def test_mixed_eval_gives_each_adapter_its_rows_and_compiles_once(setup, caplog):
    model, params, adapters = setup
    mask = np.zeros(IDS.shape, np.float32)
    mask[:, 4:] = 1.0
    batch = {"input_ids": IDS, "targets": np.roll(IDS, -1, axis=1), "loss_mask": mask, "adapter_index": INDEX}
    eval_step = make_mixed_eval_step(model, n_devices=1)
    sums, counts = eval_step(stack_adapters(trees(adapters)).variables(params), batch)
    for k, adapter in enumerate(adapters):
        rows = {key: value[INDEX == k] for key, value in batch.items() if key != "adapter_index"}
        cfg, lora = adapter
        loss, count = jax.jit(loss_sums, static_argnums=0)(
            model.clone(lora=cfg), {"params": params, "lora": lora}, rows
        )
        np.testing.assert_allclose(sums[k], loss, rtol=1e-5)
        assert counts[k] == count == 8 * (INDEX == k).sum()
    # another stack of the same shapes (other values) runs in the same compiled step
    others = [(cfg, map_factors(lambda x: -2.0 * x, lora)) for cfg, lora in adapters]
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        again, _ = eval_step(stack_adapters(trees(others)).variables(params), batch)
    assert not [r for r in caplog.records if "Compiling" in r.getMessage()]
    assert not np.allclose(again, sums)


def test_a_bad_index_or_stack_is_one_line(setup):
    _, params, adapters = setup
    with pytest.raises(ConfigError, match=r"adapter index 3 is outside the stack of 3 adapters; valid: 0..2, or -1"):
        check_index([0, 3], 3)
    with pytest.raises(ConfigError, match="adapter_index must be 4 integers, one per row"):
        check_index([0, 1], 3, rows=4)
    dora = jlora.LoraConfig(r=2, use_dora=True)
    with pytest.raises(CheckpointError, match="adapter 1 is a DoRA adapter"):
        stack_adapters([adapters[0][1], jlora.init_lora(jax.random.key(0), dora, params)])
    with pytest.raises(ValueError, match="need per-row weights"):
        stack = stack_adapters(trees(adapters))
        jlora.GPT2(CONFIG, jlora.LoraConfig()).apply({"params": params, "lora": stack.lora}, jnp.asarray(IDS))


@pytest.mark.parametrize("bad", ["A", "B", "scaling", "huge"])
def test_a_non_finite_adapter_leaves_the_other_rows_as_they_are(setup, bad):
    """0 x NaN is NaN: a row's answer must not read another adapter, whatever that adapter holds (NaN or inf in A,
    B or its scale, or finite factors whose update overflows). The healthy rows equal their adapter alone, in
    the logits and in generation; the poisoned adapter's own rows are not finite."""
    model, params, adapters = setup
    poison = {
        "A": lambda a: {**a, "A": a["A"].at[0, 0].set(jnp.nan)},
        "B": lambda a: {**a, "B": a["B"].at[0, 0].set(jnp.inf)},
        "scaling": lambda a: {**a, "scaling": jnp.asarray(jnp.nan)},
        "huge": lambda a: {**a, "A": a["A"] * 1e30, "B": a["B"] * 1e30},
    }[bad]
    lora = jax.tree.map(lambda x: x, adapters[1][1])
    lora["h"]["0"]["attn"]["c_attn"] = poison(lora["h"]["0"]["attn"]["c_attn"])
    stack = stack_adapters([adapters[0][1], lora, adapters[2][1]])
    mixed = np.asarray(jax.jit(model.apply)(mixed_variables(params, stack, INDEX), IDS))
    for k in (0, 2, -1):
        rows = INDEX == k
        expected = alone(model, params, None if k < 0 else adapters[k], IDS[rows])
        np.testing.assert_allclose(mixed[rows], expected, atol=2e-5, rtol=0)
    assert not np.isfinite(mixed[INDEX == 1]).all()

    prompts = [list(row[:6]) for row in IDS]
    out = jlora.generate(model, params, prompts, adapters=stack, adapter_index=INDEX, max_new_tokens=4)
    for n, k in enumerate(INDEX):
        if k == 1:
            continue
        solo = dict(lora=adapters[k][1]) if k >= 0 else {}
        m = model.clone(lora=adapters[k][0]) if k >= 0 else model
        expected = jlora.generate(m, params, [prompts[n]], max_new_tokens=4, **solo)
        np.testing.assert_array_equal(out.tokens[n], expected.tokens[0])
