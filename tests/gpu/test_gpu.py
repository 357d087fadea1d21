"""The checks that need a GPU (run by scripts/device_check.sh on the device machine; skipped on a CPU).

Each compares the accelerator path against a reference computed the plain way: cuDNN's fused
attention against XLA's, a bfloat16 step against float32, a population's members against their
solo steps, in the precision the GPU computes in.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.core.lora.adapter import map_factors
from jlora.core.models.decoder import causal_attention

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


def relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_fused_attention_is_taken_and_matches_xla():
    q, k, v = (jax.random.normal(jax.random.key(i), (4, 256, 12, 64), jnp.bfloat16) for i in range(3))
    fused = jax.jit(lambda q, k, v: causal_attention(q, k, v, None, 0.125, "cudnn"))
    plain = jax.jit(lambda q, k, v: causal_attention(q, k, v, None, 0.125, "xla"))
    assert "cudnn" in fused.lower(q, k, v).compile().as_text().lower()  # the custom call is there
    assert relative(fused(q, k, v), plain(q, k, v)) < 1e-2
    grad = lambda f: jax.grad(lambda q: jnp.sum(f(q, k, v).astype(jnp.float32) ** 2))(q)  # noqa: E731
    assert relative(grad(fused), grad(plain)) < 2e-2


def small_step(dtype: str, r: int = 8):
    config = jlora.GPT2Config(vocab_size=1000, n_positions=128, n_embd=256, n_layer=2, n_head=4, dtype=dtype)
    cfg = jlora.LoraConfig(r=r, alpha=2 * r)
    model = jlora.GPT2(config, cfg)
    params = jlora.random_params(0, config)
    lora = map_factors(lambda x: x + 0.02, jlora.init_lora(jax.random.key(1), cfg, params))
    variables = {"params": params, "lora": lora}
    mask = jlora.trainable_mask(variables)
    ocfg = jlora.OptimConfig(lr=1e-3, total_steps=10, warmup_steps=0)
    optimizer = jlora.make_optimizer(ocfg, jlora.partition(variables, mask)[0])
    state = jlora.init_state(variables, mask, optimizer)
    step = jlora.make_train_step(model, optimizer, ocfg)
    ids = np.random.default_rng(0).integers(0, 1000, (8, 129)).astype(np.int32)
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((8, 128), np.float32)}
    return step, state, batch


def test_a_bfloat16_step_tracks_float32():
    losses = {}
    for dtype in ("float32", "bfloat16"):
        step, state, batch = small_step(dtype)
        losses[dtype] = []
        for _ in range(3):
            state, metrics = step(state, batch, jax.random.key(2))
            losses[dtype].append(float(metrics["loss"]))
    assert all(np.isfinite(losses["bfloat16"]))
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)


def test_population_members_equal_their_solo_steps_on_the_gpu():
    from jlora.core.update.population import Member, init_population, make_population_step, population, stack_variables

    config = jlora.GPT2Config(vocab_size=500, n_positions=64, n_embd=64, n_layer=2, n_head=2)
    params = jlora.random_params(0, config)
    cfgs = [jlora.LoraConfig(r=r, alpha=2 * r) for r in (2, 4)]
    loras = [map_factors(lambda x: x + 0.01, jlora.init_lora(jax.random.key(i), c, params)) for i, c in enumerate(cfgs)]
    ocfg = jlora.OptimConfig(lr=1e-2, total_steps=10, warmup_steps=0)
    pop = population([Member(c, lr=1e-2) for c in cfgs], params)
    variables = stack_variables(params, loras, pop)
    mask = jlora.trainable_mask(variables)
    pstate = init_population(variables, mask, ocfg, pop)
    pstep = make_population_step(jlora.GPT2(config, cfgs[-1]), ocfg, pop)
    ids = np.random.default_rng(1).integers(0, 500, (4, 33)).astype(np.int32)
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((4, 32), np.float32)}
    keys = jax.random.split(jax.random.key(0), 2)
    _, metrics = pstep(pstate, batch, keys)
    for k, (c, lora) in enumerate(zip(cfgs, loras)):
        solo_vars = {"params": params, "lora": lora}
        solo_mask = jlora.trainable_mask(solo_vars)
        optimizer = jlora.make_optimizer(ocfg, jlora.partition(solo_vars, solo_mask)[0])
        solo = jlora.make_train_step(jlora.GPT2(config, c), optimizer, ocfg)
        _, m = solo(jlora.init_state(solo_vars, solo_mask, optimizer), batch, keys[k])
        np.testing.assert_allclose(float(metrics["loss"][k]), float(m["loss"]), rtol=1e-4)
