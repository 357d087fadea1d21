"""AdaLoRA against PEFT's: the budget at every step, the masks from the same gradients, five training steps, and
the adapter's update, penalty and plain form."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from peft import AdaLoraConfig as PeftAdaLoraConfig
from peft import get_peft_model
from peft.tuners.adalora.layer import RankAllocator
from transformers import GPT2LMHeadModel

import jlora
from jlora.core.lora.adalora import (
    AdaLoraConfig,
    allocate,
    as_plain,
    budget_schedule,
    kept,
    orthogonality,
)
from jlora.core.lora.adapter import adapter_delta
from jlora.core.update.optim import make_optimizer, partition, trainable_mask
from jlora.core.update.step import init_state, make_train_step
from jlora.errors import ConfigError
from jlora.exchange.hf_checkpoint import load_model

SCHEDULES = [
    dict(init_r=12, target_r=4, tinit=0, tfinal=0, deltaT=1, total_step=20),
    dict(init_r=8, target_r=2, tinit=3, tfinal=5, deltaT=3, total_step=30),
    dict(init_r=6, target_r=6, tinit=1, tfinal=1, deltaT=2, total_step=7),
]
TARGETS = ("c_attn", "c_fc")


@pytest.mark.parametrize("settings", SCHEDULES)
def test_the_budget_at_every_step_is_pefts(settings):
    peft_config = PeftAdaLoraConfig(target_modules=list(TARGETS), **settings)
    allocator = RankAllocator.__new__(RankAllocator)  # its schedule alone: no model to count
    allocator.peft_config, allocator.init_bgt, allocator.target_bgt = peft_config, settings["init_r"] * 5, None
    allocator.target_bgt = settings["target_r"] * 5
    budgets, masks = budget_schedule(AdaLoraConfig(**settings), n_modules=5)
    T, tfinal = settings["total_step"], settings["tfinal"]
    for step in range(T + 1):
        budget, mask = allocator.budget_schedule(step)
        assert budgets[step] == budget, step
        assert masks[step] == (mask or step == T - tfinal), step  # PEFT forces the mask at T - tfinal


def tiny_adalora(directory, settings, *, seed=0):
    """(PEFT's AdaLoRA model, jlora's model, params and the same adapters)."""
    torch.manual_seed(seed)
    config = PeftAdaLoraConfig(
        target_modules=list(TARGETS), lora_alpha=8, fan_in_fan_out=True, task_type="CAUSAL_LM", **settings
    )
    peft = get_peft_model(GPT2LMHeadModel.from_pretrained(directory), config).eval()  # no dropout
    cfg = jlora.LoraConfig(r=settings["init_r"], alpha=8, target_modules=TARGETS, init="adalora")
    model, params = load_model(directory, lora=cfg)
    named = dict(peft.named_modules())
    flat = {}
    for path in cfg.module_paths(params):
        layer = named[f"base_model.model.transformer.{path}"]
        a, e, b = (getattr(layer, f"lora_{k}")["default"].detach().numpy() for k in "AEB")
        flat[path] = {"A": jnp.asarray(a), "E": jnp.asarray(e[:, 0]), "B": jnp.asarray(b)}
    return peft, model, params, jlora.with_scaling(jlora.unflatten_adapters(flat), cfg)


def peft_triplets(peft, path):
    layer = dict(peft.named_modules())[f"base_model.model.transformer.{path}"]
    return {k: getattr(layer, f"lora_{k}")["default"] for k in "AEB"}


def test_masks_from_the_same_gradients_are_pefts(tiny_hf):
    """Fixed gradients, parameters moved by a fixed amount each step: PEFT's RankAllocator and jlora's allocator
    see the same values and gradients, and must zero the same entries of E at every step."""
    settings = dict(init_r=6, target_r=2, tinit=1, tfinal=2, deltaT=2, total_step=9)
    peft, _, _, lora = tiny_adalora(tiny_hf[0], settings)
    rng = np.random.default_rng(0)
    paths = list(jlora.flatten_adapters(lora))
    with torch.no_grad():  # E away from 0, as after some training
        for p in paths:
            peft_triplets(peft, p)["E"].copy_(torch.tensor(rng.normal(size=(6, 1)), dtype=torch.float32))
    factors = {  # the trainable leaves (no scale), E as PEFT's now is
        p: {"A": a["A"], "E": jnp.asarray(peft_triplets(peft, p)["E"].detach().numpy()[:, 0]), "B": a["B"]}
        for p, a in jlora.flatten_adapters(lora).items()
    }
    trainable = {"lora": jlora.unflatten_adapters(factors)}
    moves = optax.GradientTransformation(
        lambda params: optax.EmptyState(), lambda g, s, p=None: (jax.tree.map(lambda x: 0.01 * x, g), s)
    )
    allocator = allocate(moves, AdaLoraConfig(**settings), run_steps=9)
    state = allocator.init(trainable)
    for step in range(9):
        grads = {p: {k: rng.normal(size=np.shape(a[k])).astype(np.float32) for k in "AEB"} for p, a in
                 jlora.flatten_adapters(trainable["lora"]).items()}  # fmt: skip
        with torch.no_grad():
            for p in paths:
                for k, tensor in peft_triplets(peft, p).items():
                    g = grads[p][k][:, None] if k == "E" else grads[p][k]
                    tensor.add_(0.01 * torch.tensor(g))
                    tensor.grad = torch.tensor(g)
        peft.base_model.update_and_allocate(step)
        updates, state = allocator.update({"lora": jlora.unflatten_adapters(grads)}, state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        ours = jlora.flatten_adapters(trainable["lora"])
        for p in paths:
            theirs = peft_triplets(peft, p)["E"].detach().numpy()[:, 0]
            np.testing.assert_array_equal(np.asarray(ours[p]["E"]) == 0, theirs == 0, err_msg=f"step {step} {p}")
            np.testing.assert_allclose(ours[p]["E"], theirs, atol=1e-6)
    assert 0 < sum(int((np.asarray(a["E"]) != 0).sum()) for a in ours.values()) <= 2 * len(paths)


def test_five_steps_from_the_same_weights_give_pefts_losses(tiny_hf):
    """AdamW, the orthogonality penalty, the importance EMAs, the budget's masks and the final mask in five steps."""
    settings = dict(init_r=6, target_r=2, tinit=1, tfinal=1, deltaT=1, total_step=5)
    peft, model, params, lora = tiny_adalora(tiny_hf[0], settings)
    variables = {"params": params, "lora": lora}
    mask = trainable_mask(variables)
    optim = jlora.OptimConfig(lr=3e-2, schedule="constant", clip_norm=None, total_steps=5)
    optimizer = make_optimizer(optim, partition(variables, mask)[0], adalora=AdaLoraConfig(**settings))
    state = init_state(variables, mask, optimizer)
    step = make_train_step(model, optimizer, optim, n_devices=1, dropout=False)
    adamw = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=3e-2, weight_decay=0.0)
    ours, theirs = [], []
    for i, ids in enumerate(np.random.default_rng(0).integers(0, 101, (5, 4, 12))):
        loss_mask = np.ones(ids.shape, np.float32)
        loss_mask[:, -1] = 0  # the last position predicts nothing (transformers' labels shift)
        state, metrics = step(state, {"input_ids": ids, "targets": np.roll(ids, -1, 1), "loss_mask": loss_mask}, None)
        ours.append(float(metrics["loss"]))
        out = peft(input_ids=torch.tensor(ids), labels=torch.tensor(ids))  # its loss: cross-entropy + penalty
        logits = out.logits[:, :-1].reshape(-1, 101)
        theirs.append(float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[:, 1:]).reshape(-1))))
        out.loss.backward()
        adamw.step()
        peft.base_model.update_and_allocate(i)
        adamw.zero_grad()
    assert len(set(ours)) == 5  # the losses move
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    for path, adapter in jlora.flatten_adapters(state.trainable["lora"]).items():
        triplets = peft_triplets(peft, path)
        np.testing.assert_array_equal(np.asarray(adapter["E"]) == 0, triplets["E"].detach().numpy()[:, 0] == 0)
        np.testing.assert_allclose(adapter["A"], triplets["A"].detach().numpy(), atol=1e-5)
        np.testing.assert_allclose(adapter["B"], triplets["B"].detach().numpy(), atol=1e-5)
    kept_total = sum(
        int((np.asarray(a["E"]) != 0).sum()) for a in jlora.flatten_adapters(state.trainable["lora"]).values()
    )
    assert kept_total <= 2 * 4  # the final budget: target_r per module


def test_the_update_is_b_diag_e_a_and_its_plain_form_equals_it():
    cfg = jlora.LoraConfig(r=4, alpha=8, target_modules=("c_attn",), init="adalora")
    params = jlora.init_params(
        jax.random.key(0), jlora.GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    )
    lora = jlora.init_lora(jax.random.key(1), cfg, params)
    adapter = jlora.flatten_adapters(lora)["h.0.attn.c_attn"]
    assert (adapter["A"].shape, adapter["E"].shape, adapter["B"].shape) == ((4, 8), (4,), (24, 4))
    assert float(adapter["scaling"]) == pytest.approx(8 / (4 + 1e-5))  # PEFT's lora_alpha / (ranknum + 1e-5)
    assert np.asarray(adapter["E"]).tolist() == [0.0] * 4 and abs(float(adapter["A"].std()) - 0.02) < 0.01
    e = jnp.asarray([0.5, 0.0, -1.0, 0.0])
    lora = jlora.unflatten_adapters({"h.0.attn.c_attn": {**adapter, "E": e}})
    x = jax.random.normal(jax.random.key(2), (3, 8))
    expected = adapter["scaling"] * x @ (adapter["B"] @ (adapter["A"] * e[:, None])).T
    np.testing.assert_allclose(adapter_delta(x, jlora.flatten_adapters(lora)["h.0.attn.c_attn"]), expected, atol=1e-6)
    plain, ranks = as_plain(lora)
    assert ranks == {"h.0.attn.c_attn": 2} and np.asarray(
        kept(jlora.flatten_adapters(lora)["h.0.attn.c_attn"])
    ).tolist() == [True, False, True, False]
    np.testing.assert_allclose(adapter_delta(x, jlora.flatten_adapters(plain)["h.0.attn.c_attn"]), expected, atol=1e-6)
    merged = jlora.merge(params, lora)
    np.testing.assert_allclose(
        merged["h"]["0"]["attn"]["c_attn"]["kernel"] - params["h"]["0"]["attn"]["c_attn"]["kernel"],
        adapter["scaling"] * (adapter["B"] @ (adapter["A"] * e[:, None])).T,
        atol=1e-6,
    )


def test_the_penalty_is_pefts_mean_of_frobenius_norms():
    rng = np.random.default_rng(0)
    flat = {
        f"h.{i}.attn.c_attn": {"A": rng.normal(size=(3, 5)), "E": np.zeros(3), "B": rng.normal(size=(7, 3))}
        for i in range(2)
    }
    norms = [np.linalg.norm(a["A"] @ a["A"].T - np.eye(3)) for a in flat.values()]
    norms += [np.linalg.norm(a["B"].T @ a["B"] - np.eye(3)) for a in flat.values()]
    lora = jax.tree.map(jnp.float32, jlora.unflatten_adapters(flat))
    assert float(orthogonality(lora)) == pytest.approx(np.mean(norms), rel=1e-5)


def test_adalora_settings_are_checked():
    with pytest.raises(ConfigError, match="target_r=9 must be <= init_r=8"):
        AdaLoraConfig(init_r=8, target_r=9)
    with pytest.raises(ConfigError, match=r"tinit=5 \+ tfinal=5 must be < the schedule's 10 steps"):
        AdaLoraConfig(tinit=5, tfinal=5).steps(10)
    with pytest.raises(ConfigError, match="beta1 must be in"):
        AdaLoraConfig(beta1=1.0)


def test_combining_an_adalora_adapter_reads_it_as_its_plain_form():
    from jlora.core.algebra.combine import combine_adapters

    config = jlora.GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    params = jlora.init_params(jax.random.key(0), config)
    lora = jlora.init_lora(jax.random.key(1), jlora.LoraConfig(r=4, alpha=8, init="adalora"), params)
    e = jnp.asarray([1.0, 0.0, 2.0, 0.5])
    lora = jlora.unflatten_adapters({p: {**a, "E": e} for p, a in jlora.flatten_adapters(lora).items()})
    _, combined = combine_adapters([lora], method="linear", weights=[1.0])
    assert "E" not in jlora.flatten_adapters(combined)["h.0.attn.c_attn"]
    model, ids = jlora.GPT2(config), np.arange(8)[None] % 11
    np.testing.assert_allclose(
        model.apply({"params": params, "lora": combined}, ids),
        model.apply({"params": params, "lora": lora}, ids),
        atol=1e-6,
    )
