"""Task-tensor merges against PEFT's own `peft.utils.merge_utils` on the same tensors; DARE's drop rate and rescale."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft.utils import merge_utils

from jlora.core.algebra import task_vectors as tv

RNG = np.random.default_rng(0)
TENSORS = RNG.normal(size=(3, 6, 5)).astype(np.float32)
WEIGHTS = np.array([0.7, -0.4, 1.3], np.float32)
KEEP = RNG.random(TENSORS.shape) < 0.5  # DARE's keep masks, shared by both sides


def peft_merge(method, density, sign, monkeypatch):
    """PEFT's function of that name on the same tensors, its Bernoulli draws replaced by KEEP in order."""
    masks = iter(KEEP)

    def random_pruning(tensor, density, rescale):
        pruned = tensor * torch.from_numpy(next(masks)).to(tensor.dtype)
        return pruned / density if rescale else pruned

    monkeypatch.setattr(merge_utils, "random_pruning", random_pruning)
    tensors, weights = [torch.from_numpy(t) for t in TENSORS], torch.from_numpy(WEIGHTS)
    if method == "task_arithmetic":
        return merge_utils.task_arithmetic(tensors, weights).numpy()
    if method in ("ties", "dare_ties"):
        return getattr(merge_utils, method)(tensors, weights, density, sign).numpy()
    return getattr(merge_utils, method)(tensors, weights, density).numpy()


@pytest.mark.parametrize("method", tv.METHODS)
@pytest.mark.parametrize(("density", "sign"), [(0.4, "total"), (0.7, "frequency"), (1.0, "total")])
def test_merge_equals_peft(method, density, sign, monkeypatch):
    ours = tv.merge(method, jnp.asarray(TENSORS), jnp.asarray(WEIGHTS), density=density, keep=KEEP,
                    majority_sign_method=sign)  # fmt: skip
    np.testing.assert_allclose(np.asarray(ours), peft_merge(method, density, sign, monkeypatch), rtol=1e-6, atol=1e-6)


def test_trim_keeps_the_largest_magnitudes():
    t = TENSORS[0]
    kept = np.asarray(tv.trim(jnp.asarray(t), 0.4))
    k = int(0.4 * t.size)  # 12 of 30
    largest = np.argsort(-np.abs(t).reshape(-1))[:k]
    expected = np.zeros(t.size, np.float32)
    expected[largest] = t.reshape(-1)[largest]
    np.testing.assert_array_equal(kept.reshape(-1), expected)
    assert (np.asarray(tv.trim(jnp.asarray(t), 0.01)) == 0).all()  # int(0.3) = 0 entries kept


def test_dare_drop_rate_and_rescale():
    t = jnp.asarray(RNG.normal(size=(200, 300)).astype(np.float32))
    density = 0.3
    keep = tv.drop_mask(jax.random.key(0), t.shape, density)
    dropped = np.asarray(tv.drop(t, density, keep))
    share = float(keep.mean())
    assert abs(share - density) < 5 * np.sqrt(density * (1 - density) / t.size)  # 5 sigma: 0.0094
    kept = np.asarray(t)[np.asarray(keep)]
    np.testing.assert_allclose(dropped[np.asarray(keep)], kept / np.float32(density), rtol=2e-7)
    assert (dropped[~np.asarray(keep)] == 0).all()
    assert not np.array_equal(keep, tv.drop_mask(jax.random.key(1), t.shape, density))
    # the rescale keeps the expectation: the mean over 400 draws of drop(1) is 1 (std of the estimate 0.0024)
    draws = jax.vmap(lambda k: tv.drop(jnp.ones(1000), density, tv.drop_mask(k, (1000,), density)))(
        jax.random.split(jax.random.key(2), 400)
    )
    assert abs(float(draws.mean()) - 1.0) < 0.015
    assert tv.drop(t, 1.0, None) is t  # density 1 drops nothing


def test_bad_sign_method_and_mask_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown majority sign method 'most'"):
        tv.elect_sign(jnp.asarray(TENSORS), "most")
    with pytest.raises(ValueError, match=r"DARE needs a keep mask of shape \(3, 6, 5\)"):
        tv.merge("dare_linear", jnp.asarray(TENSORS), jnp.asarray(WEIGHTS), density=0.5)
