"""Training in a random subspace: z = 0 is the base model, a padded member trains as it would alone, and on a
quadratic whose solution set has codimension k, d90 lands near k."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jlora.core.lora.config import LoraConfig
from jlora.core.models.gpt2 import GPT2, GPT2Config, init_params
from jlora.core.update.optim import OptimConfig, make_optimizer
from jlora.errors import ConfigError
from jlora.research import intrinsic as it
from jlora.research.fastfood import fastfood

CONFIG = GPT2Config(vocab_size=23, n_positions=16, n_embd=16, n_layer=2, n_head=2)


def test_space_mask_selects_the_weights_lora_adapts():
    params = init_params(jax.random.key(0), CONFIG)
    cfg = LoraConfig(r=2, alpha=4, target_modules=("c_attn", "mlp.c_proj"))
    space = it.subspace(params, it.space_mask(params, cfg, modules_to_save=("ln_f",)))
    assert space.paths == (
        "h.0.attn.c_attn.kernel",
        "h.0.mlp.c_proj.kernel",
        "h.1.attn.c_attn.kernel",
        "h.1.mlp.c_proj.kernel",
        "ln_f.bias",
        "ln_f.scale",
    )
    assert space.size == 2 * (16 * 48 + 64 * 16) + 2 * 16
    lora_only = it.subspace(params, it.space_mask(params, cfg, bias="lora_only"))
    assert "h.1.mlp.c_proj.bias" in lora_only.paths and "h.1.attn.c_proj.bias" not in lora_only.paths
    whole = it.subspace(params, it.space_mask(params, cfg, whole=True))
    assert whole.size == sum(x.size for x in jax.tree.leaves(params))


@pytest.mark.parametrize("said", [False, True])
def test_z_zero_is_exactly_the_base_model(said):
    params = init_params(jax.random.key(0), CONFIG)
    model = GPT2(CONFIG)
    space = it.subspace(params, it.space_mask(params, LoraConfig(target_modules=("c_attn", "c_fc")), whole=said))
    pop = it.dims_population([40, 300], space, said=said)
    assert pop.n_scales == (len(space.paths) if said else 0) and pop.width == 300 - pop.n_scales
    state = it.init_subspace(params, fastfood(jax.random.key(1), space.size, pop.width), pop, OptimConfig())
    ids = jnp.arange(12)[None] % 23
    base = model.apply({"params": params}, ids)
    for k in range(pop.size):
        member = it.member_params(state, k, pop, space)
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(member), jax.tree.leaves(params), strict=True))
        assert np.array_equal(model.apply({"params": member}, ids), base)
    # and a z that is not zero moves exactly the space's leaves
    z = state.trainable["z"][1] + 1.0
    moved = it.subspace_params(params, space, state.frozen["proj"], z, state.trainable.get("scales", [None])[0])
    flat, flat0 = jax.tree_util.tree_leaves_with_path(moved), jax.tree_util.tree_leaves_with_path(params)
    for (path, a), (_, b) in zip(flat, flat0, strict=True):
        dotted = ".".join(str(getattr(p, "key", p)) for p in path)
        assert np.array_equal(a, b) != (dotted in space.paths), dotted


def quadratic(k=16, size=1024, seed=0):
    """loss(w) = mean((A w - b)^2) with A (k, D): its minimisers are a (D - k)-dimensional affine set."""
    rng = np.random.default_rng(seed)
    a = jnp.asarray(rng.normal(size=(k, size)) / np.sqrt(size), jnp.float32)
    b = a @ jnp.asarray(rng.normal(size=size), jnp.float32)
    params = {"w": jnp.asarray(rng.normal(size=size), jnp.float32)}
    return params, (lambda p, batch, key: jnp.mean((a @ p["w"] - b) ** 2)), a, b


def train(loss, params, space, proj, pop, cfg, steps):
    state = it.init_subspace(params, proj, pop, cfg)
    step = it.make_subspace_step(loss, space, cfg, pop)
    for _ in range(steps):
        state, _ = step(state, None, jax.random.key(0))
    return state


def test_a_padded_member_trains_as_it_would_alone():
    params, loss, _, _ = quadratic()
    space = it.subspace(params, {"w": True})
    pop = it.dims_population([3, 9, 20], space, lr=[0.1, 0.03, 0.1])  # each member its own learning rate
    proj = fastfood(jax.random.key(1), space.size, pop.width)
    cfg = OptimConfig(lr=0.03, total_steps=30, warmup_steps=5)
    state = train(loss, params, space, proj, pop, cfg, 30)
    z = np.asarray(state.trainable["z"])
    assert np.all(z[0, 3:] == 0.0) and np.all(z[1, 9:] == 0.0)  # the padding never moved
    assert np.all(z[0, :3] != 0.0) and np.all(z[2] != 0.0)
    alone = train(loss, params, space, proj, it.dims_population([9], space), cfg, 30)  # at the config's lr, 0.03
    np.testing.assert_allclose(alone.trainable["z"][0], z[1, :9], rtol=1e-5, atol=1e-6)


def test_identity_projection_is_full_training():
    params, loss, _, _ = quadratic(size=64)
    space = it.subspace(params, {"w": True})
    cfg = OptimConfig(lr=0.05, total_steps=10, weight_decay=0.0)
    state = train(loss, params, space, it.Identity(space.size), it.dims_population([space.size], space), cfg, 10)
    optimizer = make_optimizer(cfg, params)  # the same AdamW on the weights themselves
    w, opt_state = params, optimizer.init(params)
    for _ in range(10):
        updates, opt_state = optimizer.update(jax.grad(loss)(w, None, None), opt_state, w)
        w = optax.apply_updates(w, updates)
    np.testing.assert_allclose(params["w"] + state.trainable["z"][0], w["w"], rtol=1e-6, atol=1e-6)


def test_d90_of_a_quadratic_is_its_codimension():
    k = 16
    params, loss, a, b = quadratic(k)
    space = it.subspace(params, {"w": True})
    dims = list(range(2, 2 * k + 1, 2))
    pop = it.dims_population(dims, space)
    proj = fastfood(jax.random.key(1), space.size, pop.width)
    cfg = OptimConfig(lr=0.3, total_steps=1000, schedule="constant", clip_norm=None)
    state = train(loss, params, space, proj, pop, cfg, 1000)
    losses = [float(loss(it.member_params(state, i, pop, space), None, None)) for i in range(pop.size)]
    base = float(loss(params, None, None))
    # the best z of each subspace, by least squares on the dense P this projection stands for
    columns = np.asarray(jax.jit(jax.vmap(lambda e: it.apply_projection(proj, e)))(jnp.eye(pop.width))).T
    residual = np.asarray(b - a @ params["w"], np.float64)
    best = []
    for d in dims:
        m = np.asarray(a, np.float64) @ columns[:, :d]
        best.append(np.mean((m @ np.linalg.lstsq(m, residual, rcond=None)[0] - residual) ** 2))
    for d, got, want in zip(dims, losses, best, strict=True):
        if d <= k // 2:  # well conditioned: Adam reaches the optimum
            assert got == pytest.approx(want, rel=1e-3, abs=1e-6), d
        if d >= k + 4:  # the subspace meets the solution set: 99 % of the gain, as full training
            assert got < 1e-2 * base, d
    d90 = it.d90(dims, losses, base, full=0.0)
    assert k / 2 <= d90 <= 2 * k, (d90, it.recovered(losses, base, 0.0))
    assert it.d90(dims, best, base, full=0.0) in (k - 2, k)  # a random d-subspace holds ~d/k of the gain


def test_bad_dimensions_are_one_line_config_errors():
    space = it.subspace({"w": jnp.ones(10), "v": jnp.ones(3)}, {"w": True, "v": True})
    with pytest.raises(ConfigError, match="d=0 is out of range; valid: 1 .. D = 13"):
        it.dims_population([0, 4], space)
    with pytest.raises(ConfigError, match=r"d=14 is out of range"):
        it.dims_population([14], space)
    with pytest.raises(ConfigError, match=r"valid: 3 \(SAID's 2 scales \+ 1\)"):
        it.dims_population([2], space, said=True)
    with pytest.raises(ConfigError, match="selects no leaf"):
        it.subspace({"w": jnp.ones(3)}, {"w": False})
    assert it.d90([4, 8], [1.0, 1.0], base=1.0, full=1.0) is None  # nothing gained: no d90
