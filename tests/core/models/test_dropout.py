"""jlora's dropout masks: the drop rate, the scaling, independence, determinism, and one mask per key under vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.core.models.dropout import dropout, fmix32, keep_mask


def test_fmix32_is_murmurhash3s_finaliser():
    def reference(h: int) -> int:  # the C reference, in Python integers
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & 0xFFFFFFFF
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & 0xFFFFFFFF
        return h ^ (h >> 16)

    xs = np.array([0, 1, 2, 0xDEADBEEF, 0xFFFFFFFF, 123456789], np.uint32)
    assert np.asarray(fmix32(jnp.asarray(xs))).tolist() == [reference(int(x)) for x in xs]


@pytest.mark.parametrize("rate", [0.05, 0.1, 0.5])
def test_the_drop_rate_and_the_scaling(rate):
    n = 1_000_000
    y = np.asarray(dropout(jax.random.key(3), jnp.ones((1000, 1000)), rate))
    dropped = (y == 0).mean()
    assert abs(dropped - rate) < 5 * np.sqrt(rate * (1 - rate) / n)  # within 5 standard errors of a binomial
    np.testing.assert_allclose(y[y != 0], 1 / (1 - rate), rtol=1e-6)
    assert abs(y.mean() - 1) < 5 * np.sqrt(rate / (1 - rate) / n)  # inverted dropout keeps the mean


def test_neighbours_rows_and_keys_are_independent():
    """No structure a model could notice: adjacent elements, two rows, two keys and the bit planes all
    agree as often as independent Bernoulli(1/2) masks would."""
    a = np.asarray(keep_mask(jax.random.key(0), (512, 2048), 0.5))
    b = np.asarray(keep_mask(jax.random.key(1), (512, 2048), 0.5))
    n, limit = a.size, 5 / np.sqrt(a.size)
    for x, y in [(a[:, :-1], a[:, 1:]), (a[:-1], a[1:]), (a, b), (a[:, ::2], a[:, 1::2])]:
        assert abs((x == y).mean() - 0.5) < 5 / np.sqrt(x.size), "correlated"
    assert abs(a.mean() - 0.5) < limit and n == 512 * 2048
    counts = np.bincount(a.reshape(-1, 4).dot([8, 4, 2, 1]), minlength=16)  # runs of four: 16 patterns alike
    expected = a.size / 4 / 16
    assert ((counts - expected) ** 2 / expected).sum() < 60  # chi-square, 15 degrees of freedom (p < 1e-6)


def test_a_mask_is_a_function_of_the_key_and_each_key_under_vmap_has_its_own():
    x = jnp.ones((6, 50))
    keys = jax.random.split(jax.random.key(7), 3)
    batched = jax.vmap(lambda k: dropout(k, x, 0.3))(keys)
    for i, key in enumerate(keys):
        np.testing.assert_array_equal(batched[i], dropout(key, x, 0.3))
    assert not np.array_equal(batched[0], batched[1])
    jitted = jax.jit(lambda k: dropout(k, x, 0.3))(keys[0])
    np.testing.assert_array_equal(jitted, batched[0])


def test_rates_zero_and_one_and_the_module_off_in_evaluation():
    from jlora.core.models.dropout import Dropout

    x = jnp.arange(1.0, 1001.0)
    np.testing.assert_array_equal(dropout(jax.random.key(0), x, 0.0), x)
    np.testing.assert_array_equal(dropout(jax.random.key(0), x, 1.0), jnp.zeros_like(x))
    module = Dropout(0.5)
    np.testing.assert_array_equal(module.apply({}, x, deterministic=True), x)
    y = np.asarray(module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)}))
    assert ((y == 0) | np.isclose(y, 2 * x)).all() and 400 < (y == 0).sum() < 600
