"""The train step on the tiny checkpoint: identity at step 0, frozen leaves untouched, accumulation,
LoRA+, mixed precision and remat.

Batches are built by hand in `jlora.training.data`'s format: right-padded rows, the loss on the answer
and end-of-text targets only, padded targets out of range (-100) to show they never count.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import jlora
from jlora.core.update.step import gradients

LORA = jlora.LoraConfig(r=4, alpha=8)
EOT = 100


def make_batch(seed: int, rows: int, length: int, vocab: int = 101) -> dict:
    """Rows of random tokens, each with its own prompt and total length (so its own token count)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab - 1, (rows, length + 1)).astype(np.int32)
    input_ids, targets = ids[:, :-1].copy(), ids[:, 1:].copy()
    loss_mask = np.zeros((rows, length), np.float32)
    attention_mask = np.zeros((rows, length), np.int32)
    for i in range(rows):
        real = rng.integers(length // 2, length + 1)
        prompt = rng.integers(1, real - 1)
        input_ids[i, real:] = EOT
        targets[i, real - 1] = EOT
        targets[i, real:] = -100
        loss_mask[i, prompt - 1 : real] = 1.0  # the targets that are answer tokens or the end of text
        attention_mask[i, :real] = 1
    return {"input_ids": input_ids, "targets": targets, "loss_mask": loss_mask, "attention_mask": attention_mask}


def torch_loss(model, batch) -> tuple[float, float]:
    """(masked loss sum, token count) from transformers' PyTorch GPT-2."""
    with torch.no_grad():
        logits = model(torch.tensor(batch["input_ids"]).long()).logits.double()
    logp = torch.log_softmax(logits, -1)
    mask = torch.tensor(batch["loss_mask"]).double()
    targets = torch.tensor(np.where(batch["loss_mask"] > 0, batch["targets"], 0)).long()
    nll = -logp.gather(-1, targets[..., None])[..., 0]
    return float((nll * mask).sum()), float(mask.sum())


def load(directory, lora=LORA, seed=0, **overrides):
    model, params = jlora.load_gpt2(directory, lora=lora, **overrides)
    return model, {"params": params, "lora": jlora.init_lora(jax.random.key(seed), model, params)}


def setup(model, variables, cfg, **mask_options):
    mask = jlora.trainable_mask(variables, **mask_options)
    optimizer = jlora.make_optimizer(cfg, jlora.partition(variables, mask)[0])
    return jlora.init_state(variables, mask, optimizer), optimizer


def base_leaves(variables) -> dict:
    return {
        ".".join(k.key for k in p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(variables["params"])
    }


@pytest.fixture(scope="module")
def trained(tiny_hf):
    """Four updates of LoRA and ln_f (no dropout) from the tiny checkpoint, and what was seen on the way."""
    model, variables = load(tiny_hf[0])
    cfg = jlora.OptimConfig(lr=1e-2, weight_decay=0.1, total_steps=4)
    state, optimizer = setup(model, variables, cfg, modules_to_save=("ln_f",))
    step = jlora.make_train_step(model, optimizer, cfg, n_devices=1, dropout=False)
    batches = [make_batch(i, 4, 16) for i in range(4)]
    state, first = step(state, batches[0], jax.random.key(0))
    after_first = jax.tree.map(np.asarray, state.trainable)  # the next step donates these buffers
    for batch in batches[1:]:
        state, _ = step(state, batch, jax.random.key(0))
    return {
        "model": model,
        "variables": variables,
        "batch": batches[0],
        "first": first,
        "after_first": after_first,
        "state": state,
    }


def test_first_step_loss_is_the_base_models(tiny_hf, trained):
    expected_sum, expected_tokens = torch_loss(tiny_hf[1], trained["batch"])
    metrics = trained["first"]
    assert float(metrics["tokens"]) == expected_tokens == trained["batch"]["loss_mask"].sum()
    np.testing.assert_allclose(float(metrics["loss"]), expected_sum / expected_tokens, atol=1e-5)
    assert float(metrics["lr"]) == pytest.approx(1e-2) and float(metrics["grad_norm"]) > 0
    assert int(trained["state"].step) == 4

    before = jlora.flatten_adapters(trained["variables"]["lora"])["h.0.attn.c_attn"]
    after = jlora.flatten_adapters(trained["after_first"]["lora"])["h.0.attn.c_attn"]
    # B = 0 gives A no gradient at step 0: only the decoupled weight decay, lr * 0.1, moves it.
    np.testing.assert_allclose(after["A"], before["A"] * (1 - 1e-2 * 0.1), rtol=1e-6)
    assert np.abs(after["B"]).max() > 0

    eval_step = jlora.make_eval_step(trained["model"], n_devices=1)
    loss_sum, tokens = eval_step({"params": trained["variables"]["params"]}, trained["batch"])
    np.testing.assert_allclose([float(loss_sum), float(tokens)], [expected_sum, expected_tokens], rtol=1e-5)


def test_frozen_leaves_stay_bit_identical(tiny_hf, trained):
    checkpoint = base_leaves({"params": jlora.load_gpt2(tiny_hf[0])[1]})
    final = base_leaves(trained["state"].variables)
    assert final.keys() == checkpoint.keys()
    changed = {p for p in final if not np.array_equal(final[p], checkpoint[p])}
    assert changed == {"ln_f.scale", "ln_f.bias"}


def test_loss_goes_down_on_a_small_batch(tiny_hf):
    # A random GPT-2's logits are tiny (wte ~ N(0, 0.02^2)): LoRA alone barely moves them, so
    # ln_f trains too, as the embedded default run does.
    lora = jlora.LoraConfig(r=8, alpha=16, target_modules=("c_attn", "c_proj", "c_fc"))
    model, variables = load(tiny_hf[0], lora=lora)
    cfg = jlora.OptimConfig(lr=1e-2, schedule="constant")
    state, optimizer = setup(model, variables, cfg, modules_to_save=("ln_f",))
    step = jlora.make_train_step(model, optimizer, cfg, n_devices=1, dropout=False)
    batch = make_batch(3, 4, 16)
    losses = []
    for _ in range(60):
        state, metrics = step(state, batch, jax.random.key(0))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.85 * losses[0] and max(losses[-10:]) < min(losses[:10]), losses


@pytest.fixture(scope="module")
def one_batch_gradients(random_b, tiny_hf):
    """(variables with B != 0, batch of 8 rows, (grads, loss sum, tokens) of the whole batch at once)."""
    model, variables = load(tiny_hf[0])
    variables = random_b(variables)
    batch = make_batch(5, 8, 16)  # rows with different token counts: per-micro-batch means would differ
    trainable, frozen = jlora.partition(variables, jlora.trainable_mask(variables))
    return variables, batch, jax.jit(lambda t, b: gradients(model, t, frozen, b, None))(trainable, batch)


@pytest.fixture(scope="module")
def accumulated_step(tiny_hf, one_batch_gradients):
    """One LoRA+ update on that batch as 4 micro-batches of 2 rows: (cfg, optimizer, state before, after, metrics)."""
    variables, batch, _ = one_batch_gradients
    model, _ = load(tiny_hf[0])
    cfg = jlora.OptimConfig(lr=1e-3, grad_accum=4, loraplus_ratio=8.0, clip_norm=None)
    state, optimizer = setup(model, variables, cfg)
    start = jax.tree.map(np.asarray, state)
    step = jlora.make_train_step(model, optimizer, cfg, n_devices=1, dropout=False)
    return (cfg, optimizer, start, *step(state, batch, jax.random.key(0)))


def test_gradient_accumulation_equals_one_big_batch(one_batch_gradients, accumulated_step):
    _, _, (grads, loss_sum, tokens) = one_batch_gradients
    _, optimizer, start, state, metrics = accumulated_step
    expected = optax.apply_updates(start.trainable, optimizer.update(grads, start.opt_state, start.trainable)[0])
    np.testing.assert_allclose(float(metrics["tokens"]), float(tokens))
    np.testing.assert_allclose(float(metrics["loss"]), float(loss_sum / tokens), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.global_norm(grads)), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(state.trainable), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_loraplus_gives_b_lambda_times_the_learning_rate(accumulated_step):
    cfg, _, start, state, _ = accumulated_step
    before, after = (jlora.flatten_adapters(s.trainable["lora"]) for s in (start, state))
    assert len(before) == 2
    for path in before:
        delta = {k: np.abs(np.asarray(after[path][k]) - before[path][k]) for k in "AB"}
        # Adam's first update is lr * g / (|g| + eps): lr in size wherever g is not tiny.
        assert np.median(delta["A"]) == pytest.approx(cfg.lr, rel=1e-3)
        assert np.median(delta["B"]) == pytest.approx(cfg.loraplus_ratio * cfg.lr, rel=1e-3)
        assert delta["B"].max() <= cfg.loraplus_ratio * cfg.lr * (1 + 1e-5)


def test_bfloat16_compute_with_float32_adapters(tiny_hf):
    directory, reference = tiny_hf
    batch = make_batch(7, 4, 16)
    expected_sum, expected_tokens = torch_loss(reference, batch)
    model, variables = load(directory, dtype="bfloat16")
    cfg = jlora.OptimConfig(lr=1e-2)
    state, optimizer = setup(model, variables, cfg, modules_to_save=("ln_f",))
    step = jlora.make_train_step(model, optimizer, cfg, n_devices=1, dropout=False)
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch, jax.random.key(0))
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses[0], expected_sum / expected_tokens, rtol=1e-2)
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert {x.dtype for x in jax.tree.leaves(state.trainable)} == {jnp.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(state.opt_state)} == {jnp.dtype("float32"), jnp.dtype("int32")}


def test_remat_gives_the_same_gradients(tiny_hf, one_batch_gradients):
    variables, batch, expected = one_batch_gradients
    model, _ = load(tiny_hf[0], remat=True)
    trainable, frozen = jlora.partition(variables, jlora.trainable_mask(variables))
    out = jax.jit(lambda t, b: gradients(model, t, frozen, b, None))(trainable, batch)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_label_smoothing_trains_the_smoothed_loss_and_evaluates_the_plain_one(tiny_hf):
    """optim.label_smoothing reaches the solo step and a population's (the logged loss is torch's smoothed
    cross-entropy); the evaluation step scores plain cross-entropy."""
    from jlora.core.update.population import Member, init_population, make_population_step, population, stack_variables

    model, variables = load(tiny_hf[0])
    batch = make_batch(3, 4, 16)
    cfg = jlora.OptimConfig(lr=1e-2, total_steps=2, label_smoothing=0.1)
    state, optimizer = setup(model, variables, cfg)
    _, metrics = jlora.make_train_step(model, optimizer, cfg, n_devices=1, dropout=False)(
        state, batch, jax.random.key(0)
    )
    with torch.no_grad():
        logits = tiny_hf[1](torch.tensor(batch["input_ids"]).long()).logits.double()
    targets = torch.tensor(np.where(batch["loss_mask"] > 0, batch["targets"], -100)).long()
    smoothed = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), label_smoothing=0.1)
    np.testing.assert_allclose(float(metrics["loss"]), float(smoothed), rtol=1e-5)
    plain_sum, tokens = torch_loss(tiny_hf[1], batch)
    assert abs(float(metrics["loss"]) - plain_sum / tokens) > 1e-4  # near-uniform logits: small, 7x the tolerance

    pop = population([Member(LORA, 1e-2)], variables["params"])
    stacked = stack_variables(variables["params"], [variables["lora"]], pop)
    pop_state = init_population(stacked, jlora.trainable_mask(stacked), cfg, pop)
    step = make_population_step(model, cfg, pop, n_devices=1, dropout=False)
    _, pop_metrics = step(pop_state, batch, jax.random.key(0)[None])
    np.testing.assert_allclose(np.asarray(pop_metrics["loss"]), [float(metrics["loss"])], rtol=1e-6)

    loss_sum, _ = jlora.make_eval_step(model, n_devices=1)({"params": variables["params"]}, batch)
    np.testing.assert_allclose(float(loss_sum), plain_sum, rtol=1e-5)
