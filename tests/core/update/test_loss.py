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
