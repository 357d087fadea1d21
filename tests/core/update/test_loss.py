"""The loss: the chunked head at loss positions against float64 numpy and against the full head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.core.update.loss import head_argmax, head_loss_sum, loss_argmax, loss_sums, token_losses
from jlora.core.update.optim import combine, partition


def numpy_head(h, wte, targets, weights):
    """(Σ w CE, d/dh, d/dwte, d/dweights) in float64: softmax - onehot, by hand."""
    h, wte = np.float64(h), np.float64(wte)
    logits = h @ wte.T
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    losses = lse - logits[np.arange(len(targets)), targets]
    dlogits = np.exp(logits - lse[:, None])
    dlogits[np.arange(len(targets)), targets] -= 1
    dlogits *= weights[:, None]
    return (weights * losses).sum(), dlogits @ wte, dlogits.T @ h, losses


@pytest.fixture(scope="module")
def head_inputs():
    rng = np.random.default_rng(0)
    n, d, v = 37, 16, 101  # 37 positions in chunks of 8: the last chunk is padded
    h = rng.normal(size=(n, d)).astype(np.float32)
    wte = (0.5 * rng.normal(size=(v, d))).astype(np.float32)
    targets = rng.integers(0, v, n).astype(np.int32)
    weights = (rng.random(n) < 0.7).astype(np.float32)
    return h, wte, targets, weights


def test_chunked_head_loss_and_gradients_against_float64(head_inputs):
    h, wte, targets, weights = head_inputs
    expected = numpy_head(h, wte, targets, weights)
    value, grads = jax.jit(jax.value_and_grad(head_loss_sum, argnums=(0, 1, 3)), static_argnums=4)(
        h, wte, targets, weights, 8
    )
    np.testing.assert_allclose(value, expected[0], rtol=1e-6)
    for got, want in zip(grads, expected[1:], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # forward only (evaluation), one chunk or many: the same sum
    for chunk in (8, 64):
        np.testing.assert_allclose(head_loss_sum(h, wte, targets, weights, chunk), expected[0], rtol=1e-6)
    np.testing.assert_array_equal(head_argmax(h, wte, 8), np.argmax(np.float64(h) @ np.float64(wte).T, axis=-1))


def test_a_frozen_embedding_gets_no_gradient_formed(head_inputs):
    h, wte, targets, weights = head_inputs
    v, d = wte.shape
    frozen = jax.make_jaxpr(jax.grad(lambda h: head_loss_sum(h, wte, targets, weights, 8)))(h)
    trained = jax.make_jaxpr(jax.grad(lambda w: head_loss_sum(h, w, targets, weights, 8)))(wte)

    def vocab_matmuls(jaxpr) -> int:  # dot_generals producing a (V, D) array, inside the scan too
        text = str(jaxpr)
        return text.count(f"f32[{v},{d}] = dot_general")

    assert vocab_matmuls(frozen) == 0 and vocab_matmuls(trained) == 1


@pytest.fixture(scope="module")
def tiny(tiny_hf, random_b):
    model, params = jlora.load_gpt2(tiny_hf[0], lora=jlora.LoraConfig(r=4, alpha=8))
    variables = random_b({"params": params, "lora": jlora.init_lora(jax.random.key(0), model, params)})
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 100, (3, 21)).astype(np.int32)
    loss_mask = np.zeros((3, 20), np.float32)
    loss_mask[0, 5:9], loss_mask[1, 12:20], loss_mask[2, 0:3] = 1, 1, 1
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": loss_mask}
    # the loss positions of each row first (at most 8), then positions without loss
    index = np.argsort(loss_mask == 0, axis=1, kind="stable")[:, :8].astype(np.int32)
    return model, variables, batch, {**batch, "loss_index": index}


def full_head_sums(model, variables, batch):
    """Today's loss: logits at every position, then the masked cross-entropy."""
    losses = token_losses(model.apply(variables, batch["input_ids"]), batch["targets"])
    return jnp.sum(losses * batch["loss_mask"]), jnp.sum(batch["loss_mask"])


def test_loss_position_head_equals_the_full_head(tiny):
    model, variables, batch, indexed = tiny

    def value_and_grad(sums, b, trains_wte=False):
        mask = jax.tree_util.tree_map_with_path(
            lambda p, _: p[0].key == "lora" or trains_wte and p[1].key == "wte", variables
        )
        trainable, frozen = partition(variables, mask)
        return jax.jit(jax.value_and_grad(lambda t: sums(model, combine(t, frozen), b)[0]))(trainable)

    cases = [(batch, False), (indexed, False), (indexed, True)]  # every position a candidate, or the listed ones
    expected_for = {w: value_and_grad(full_head_sums, batch, w) for w in (False, True)}
    for shaped, trains_wte in cases:
        expected = expected_for[trains_wte]
        got = value_and_grad(loss_sums, shaped, trains_wte)
        np.testing.assert_allclose(got[0], expected[0], rtol=1e-6)
        for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(expected[1]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(loss_sums(model, variables, indexed)[1]) == batch["loss_mask"].sum() == 15
    full = np.argmax(np.asarray(model.apply(variables, batch["input_ids"])), axis=-1)
    predicted = jax.jit(lambda v, b: loss_argmax(model, v, b))(variables, indexed)
    np.testing.assert_array_equal(predicted, np.take_along_axis(full, indexed["loss_index"], axis=1))


# --- label smoothing ---------------------------------------------------------------------------------------------


def torch_smoothed(h, wte, targets, weights, eps):
    """(Σ w CE_eps, d/dh, d/dwte) by torch.nn.functional.cross_entropy(label_smoothing=eps), float64 autograd."""
    import torch

    h64 = torch.tensor(np.float64(h), requires_grad=True)
    wte64 = torch.tensor(np.float64(wte), requires_grad=True)
    kept = torch.tensor(
        np.where(weights > 0, targets, -100).astype(np.int64)
    )  # weight 0: ignore_index, as the loss mask does
    loss = torch.nn.functional.cross_entropy(h64 @ wte64.T, kept, label_smoothing=eps, reduction="sum")
    loss.backward()
    return loss.item(), h64.grad.numpy(), wte64.grad.numpy()


def test_label_smoothing_equals_torch_cross_entropy(head_inputs):
    h, wte, targets, weights = head_inputs
    expected = torch_smoothed(h, wte, targets, weights, 0.1)
    value, grads = jax.jit(jax.value_and_grad(head_loss_sum, argnums=(0, 1)), static_argnums=(4, 5))(
        h, wte, targets, weights, 8, 0.1
    )
    np.testing.assert_allclose(value, expected[0], rtol=1e-6)
    for got, want in zip(grads, expected[1:], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for chunk in (8, 64):  # forward only: the same sum
        np.testing.assert_allclose(head_loss_sum(h, wte, targets, weights, chunk, 0.1), expected[0], rtol=1e-6)
    assert abs(value - numpy_head(h, wte, targets, weights)[0]) > 0.1  # smoothing changes the loss (by 0.1 %)


def test_label_smoothed_loss_at_loss_rows_equals_a_dense_computation(tiny):
    """loss_sums with loss_index (the head at the loss rows, its VJP by hand) against logits at every position."""
    model, variables, batch, indexed = tiny
    eps = 0.1

    def dense(variables):
        logits = model.apply(variables, batch["input_ids"]).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        ce = lse - jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
        smoothed = (1 - eps) * ce + eps * (lse - jnp.mean(logits, axis=-1))
        return jnp.sum(smoothed * batch["loss_mask"])

    trainable, frozen = partition(
        variables, jax.tree_util.tree_map_with_path(lambda p, _: p[0].key == "lora", variables)
    )
    expected = jax.jit(jax.value_and_grad(lambda t: dense(combine(t, frozen))))(trainable)
    at_rows = lambda t: loss_sums(model, combine(t, frozen), indexed, label_smoothing=eps)[0]  # noqa: E731
    got = jax.jit(jax.value_and_grad(at_rows))(trainable)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(expected[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert abs(float(got[0]) - float(loss_sums(model, variables, indexed)[0])) > 1e-3


def test_zero_label_smoothing_is_the_unsmoothed_program(head_inputs, tiny):
    """eps = 0 takes no smoothing branch: the same jaxpr, value and gradient as a call that does not name it."""
    h, wte, targets, weights = head_inputs
    grad = lambda *eps: jax.make_jaxpr(jax.value_and_grad(head_loss_sum, argnums=(0, 1)), static_argnums=(4, 5))(  # noqa: E731
        h, wte, targets, weights, 8, *eps
    )
    assert str(grad(0.0)) == str(grad()) != str(grad(0.1))
    model, variables, _, indexed = tiny
    step = lambda **kw: jax.jit(jax.value_and_grad(lambda v: loss_sums(model, v, indexed, **kw)[0]))(variables)  # noqa: E731
    for a, b in zip(jax.tree.leaves(step(label_smoothing=0.0)), jax.tree.leaves(step()), strict=True):
        np.testing.assert_array_equal(a, b)
