"""The trainable mask, partition/combine, the schedule and AdamW against their references.

References: hand counts of GPT-2's leaves, transformers' schedules, torch.optim.AdamW.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jlora
from jlora.core.update.optim import OptimConfig, combine, learning_rate, make_optimizer, partition, trainable_mask

LORA = jlora.LoraConfig(r=4, alpha=8)


@pytest.fixture(scope="module")
def variables(tiny_hf):
    model, params = jlora.load_gpt2(tiny_hf[0], lora=LORA)
    return {"params": params, "lora": jlora.init_lora(jax.random.key(0), model, params)}


def selected(mask) -> set[str]:
    """Dotted paths of the True base leaves."""
    return {".".join(k.key for k in path) for path, on in jax.tree_util.tree_leaves_with_path(mask["params"]) if on}


def test_mask_selects_lora_and_the_chosen_base_leaves(variables):
    mask = trainable_mask(variables)
    assert jax.tree.structure(mask) == jax.tree.structure(variables)
    trained = {k.key: on for kp, on in jax.tree_util.tree_leaves_with_path(mask["lora"]) for k in kp[-1:]}
    assert trained == {"A": True, "B": True, "scaling": False}  # the factors train, the scale does not
    assert sum(jax.tree.leaves(mask["lora"])) == 4  # A, B x 2 layers
    assert selected(mask) == set()

    biases = {
        f"h.{i}.{m}.bias"
        for i in (0, 1)
        for m in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert selected(trainable_mask(variables, bias="all")) == biases | {"ln_f.bias"}  # PEFT: LayerNorm biases too
    assert selected(trainable_mask(variables, bias="lora_only")) == {"h.0.attn.c_attn.bias", "h.1.attn.c_attn.bias"}

    assert selected(trainable_mask(variables, modules_to_save=("ln_f",))) == {"ln_f.scale", "ln_f.bias"}
    assert selected(trainable_mask(variables, modules_to_save=["wte", "h.0.mlp.c_fc"])) == {
        "wte.embedding",
        "h.0.mlp.c_fc.kernel",
        "h.0.mlp.c_fc.bias",
    }
    every_c_fc = {f"h.{i}.mlp.c_fc.{leaf}" for i in (0, 1) for leaf in ("kernel", "bias")}
    assert selected(trainable_mask(variables, modules_to_save="c_fc")) == every_c_fc


def test_mask_slice_adapters_select_their_fused_module_bias(tiny_hf):
    model, params = jlora.load_gpt2(tiny_hf[0], lora=LORA.replace(target_modules=("c_attn.q", "c_attn.v")))
    variables = {"params": params, "lora": jlora.init_lora(jax.random.key(0), model, params)}
    mask = trainable_mask(variables, bias="lora_only")
    assert selected(mask) == {"h.0.attn.c_attn.bias", "h.1.attn.c_attn.bias"}
    assert sum(jax.tree.leaves(mask["lora"])) == 8  # q and v, A and B, 2 layers


def test_mask_rejects_unknown_names(variables):
    with pytest.raises(ValueError, match="'lm_head'") as e:
        trainable_mask(variables, modules_to_save=("ln_f", "lm_head"))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown bias 'some'"):
        trainable_mask(variables, bias="some")


def test_partition_and_combine_are_inverse(variables):
    mask = trainable_mask(variables, modules_to_save=("ln_f",))
    trainable, frozen = partition(variables, mask)
    n_leaves = len(jax.tree.leaves(variables))
    assert len(jax.tree.leaves(trainable)) == 4 + 2
    assert len(jax.tree.leaves(frozen)) == n_leaves - 6
    assert trainable["params"]["wte"]["embedding"] is None and frozen["lora"]["h"]["0"]["attn"]["c_attn"]["A"] is None
    back = combine(trainable, frozen)
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    assert all(a is b for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables), strict=True))


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_matches_transformers(schedule):
    import transformers

    warmup, total, lr = 7, 50, 3e-4
    ours = learning_rate(OptimConfig(lr=lr, warmup_steps=warmup, total_steps=total, schedule=schedule))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    if schedule == "constant":
        reference = transformers.get_constant_schedule_with_warmup(opt, warmup)
    else:
        make = getattr(transformers, f"get_{schedule}_schedule_with_warmup")
        reference = make(opt, warmup, total)
    expected = [lr * reference.lr_lambdas[0](t) for t in range(total + 1)]
    np.testing.assert_allclose([float(ours(t)) for t in range(total + 1)], expected, rtol=1e-5, atol=1e-10)


def random_tree(key):
    """A trainable-like tree: LoRA matrices and a trainable LayerNorm (1-D, no decay)."""
    k = jax.random.split(key, 4)
    return {
        "lora": {"m": {"A": jax.random.normal(k[0], (3, 5)), "B": jax.random.normal(k[1], (6, 3))}},
        "params": {"ln_f": {"scale": 1 + jax.random.normal(k[2], (5,)), "bias": jax.random.normal(k[3], (5,))}},
    }


def leaves(tree) -> list:
    """A, B, scale, bias of a `random_tree`."""
    return [
        tree["lora"]["m"]["A"],
        tree["lora"]["m"]["B"],
        tree["params"]["ln_f"]["scale"],
        tree["params"]["ln_f"]["bias"],
    ]


@pytest.mark.parametrize("loraplus_ratio", [None, 4.0])
def test_adamw_matches_torch(loraplus_ratio):
    cfg = OptimConfig(
        lr=1e-2, warmup_steps=2, total_steps=6, schedule="linear", weight_decay=0.1, clip_norm=0.5, eps=1e-6,
        loraplus_ratio=loraplus_ratio,
    )  # fmt: skip
    params = random_tree(jax.random.key(0))
    optimizer = make_optimizer(cfg, params)
    state = optimizer.init(params)

    names = ["A", "B", "scale", "bias"]
    ts = {n: torch.nn.Parameter(torch.tensor(np.asarray(x))) for n, x in zip(names, leaves(params), strict=True)}
    ratio = loraplus_ratio or 1.0
    groups = [
        {"params": [ts["A"]], "weight_decay": 0.1, "lr": cfg.lr},
        {"params": [ts["B"]], "weight_decay": 0.1, "lr": cfg.lr * ratio},
        {"params": [ts["scale"], ts["bias"]], "weight_decay": 0.0, "lr": cfg.lr},
    ]
    import transformers

    reference = torch.optim.AdamW(groups, betas=(cfg.b1, cfg.b2), eps=cfg.eps)
    sched = transformers.get_linear_schedule_with_warmup(reference, cfg.warmup_steps, cfg.total_steps)
    for step in range(5):
        grads = random_tree(jax.random.key(10 + step))
        updates, state = optimizer.update(grads, state, params)
        params = jax.tree.map(jnp.add, params, updates)
        for n, g in zip(names, leaves(grads), strict=True):
            ts[n].grad = torch.tensor(np.asarray(g))
        torch.nn.utils.clip_grad_norm_(list(ts.values()), cfg.clip_norm)
        reference.step()
        sched.step()
        for n, x in zip(names, leaves(params), strict=True):
            np.testing.assert_allclose(np.asarray(x), ts[n].detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=n)


def test_optimizer_state_holds_nothing_frozen(variables):
    cfg = OptimConfig(weight_decay=0.01, loraplus_ratio=16.0, clip_norm=1.0)
    mask = trainable_mask(variables, modules_to_save=("ln_f",))
    trainable, frozen = partition(variables, mask)
    state = jlora.init_state(variables, mask, make_optimizer(cfg, trainable))
    leaves = jax.tree.leaves(state.opt_state)
    # Hand count: Adam's mu and nu for A, B of 2 layers and ln_f's scale and bias, plus the
    # step counts of Adam and of the schedule; clipping, decay and LoRA+ hold no state.
    assert len(leaves) == 2 * (4 + 2) + 2
    assert sum(x.size for x in leaves) == 2 * (2 * (4 * 32 + 96 * 4) + 2 * 32) + 2
    frozen_shapes = {x.shape for x in jax.tree.leaves(frozen) if x.ndim == 2}
    assert frozen_shapes == {(101, 32), (64, 32), (32, 96), (32, 32), (32, 128), (128, 32)}
    assert not frozen_shapes & {x.shape for x in leaves}
    assert all(x.dtype in (jnp.float32, jnp.int32) for x in leaves)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="schedule 'step'"):
        OptimConfig(schedule="step")
    with pytest.raises(ValueError, match="grad_accum"):
        OptimConfig(grad_accum=0)
    for eps in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="label_smoothing"):
            OptimConfig(label_smoothing=eps)
    with pytest.raises(ValueError, match="nothing to train"):
        make_optimizer(OptimConfig(), {"params": {"w": None}})
