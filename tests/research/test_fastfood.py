"""The Fastfood projection against the dense matrix it stands for, built in numpy from its definition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.research.fastfood import block_size, fastfood, hadamard, project

# P applied to each row of z (K, d) -> (K, D), compiled once per shape (op by op, each primitive would compile)
many = jax.jit(jax.vmap(project, in_axes=(None, 0)))


def sylvester(length: int) -> np.ndarray:
    """The L x L Walsh-Hadamard matrix as Kronecker powers of [[1, 1], [1, -1]]."""
    h = np.ones((1, 1))
    while h.shape[0] < length:
        h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
    return h


def dense(ff, d: int) -> np.ndarray:
    """P (D, d): each block S_b H G_b Pi_b H B_b as matrices, stacked, the first D rows, the first d columns."""
    signs, perm, gauss = (np.asarray(x, np.float64) for x in (ff.signs, ff.perm, ff.gauss))
    length, size = ff.block, ff.size
    h = sylvester(length)
    blocks = []
    for b in range(ff.n_blocks):
        pi = np.zeros((length, length))
        pi[np.arange(length), perm[b].astype(int)] = 1.0  # (Pi v)_i = v[perm_i]
        v = h @ np.diag(gauss[b]) @ pi @ h @ np.diag(signs[b])
        blocks.append(v / (np.linalg.norm(gauss[b]) * np.sqrt(size)))
    return np.concatenate(blocks)[:size, :d]


def test_the_reference_hadamard_is_one():
    h = sylvester(16)
    np.testing.assert_array_equal(h @ h.T, 16 * np.eye(16))
    x = np.random.default_rng(0).normal(size=(3, 16))
    np.testing.assert_allclose(hadamard(jnp.asarray(x, jnp.float32)), x @ h, atol=1e-5)


@pytest.mark.parametrize(("size", "d"), [(37, 5), (300, 33), (7, 1)])
def test_projection_is_the_dense_matrix(size, d):
    ff = fastfood(jax.random.key(size), size, d)
    assert ff.block == block_size(d) >= d and ff.n_blocks == -(-size // ff.block)
    assert set(np.unique(np.asarray(ff.signs))) <= {-1.0, 1.0}
    assert all(sorted(row) == list(range(ff.block)) for row in np.asarray(ff.perm).tolist())  # permutations
    p = dense(ff, d)
    z = np.random.default_rng(1).normal(size=(4, d))
    got = many(ff, jnp.asarray(z, jnp.float32))
    np.testing.assert_allclose(got, z @ p.T, atol=1e-5)
    # a shorter z reads P's first columns
    np.testing.assert_allclose(many(ff, jnp.asarray(z[:, :1], jnp.float32)), z[:, :1] @ p[:, :1].T, atol=1e-5)
    # its gradient is P^T, as cheaply (the transposed butterflies and a scatter)
    y = np.random.default_rng(2).normal(size=size)
    grad = jax.jit(jax.grad(lambda v, f: jnp.dot(project(f, v), jnp.asarray(y, jnp.float32))))(jnp.zeros(d), ff)
    np.testing.assert_allclose(grad, p.T @ y, atol=1e-5)


def test_norms_are_preserved():
    ff = fastfood(jax.random.key(0), 4096, 64)  # L = 64 divides D: unit columns, exactly
    columns = many(ff, jnp.eye(64))
    np.testing.assert_allclose(jnp.linalg.norm(columns, axis=1), 1.0, atol=1e-5)
    z = jax.random.normal(jax.random.key(1), (200, 64))
    ratio = np.asarray(jnp.linalg.norm(many(ff, z), axis=1) / jnp.linalg.norm(z, axis=1))
    # ||P z||^2 / ||z||^2 has mean 1 and spread about sqrt(2 / D) over draws of G: a Johnson-Lindenstrauss map
    assert abs(ratio.mean() - 1.0) < 0.01 and ratio.std() < 0.05 and ratio.min() > 0.85 and ratio.max() < 1.15
    # the last block cut short: columns about unit
    cut = fastfood(jax.random.key(2), 4000, 64)
    norms = jnp.linalg.norm(many(cut, jnp.eye(64)), axis=1)
    assert 0.95 < float(norms.min()) and float(norms.max()) < 1.05


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="d >= 1"):
        fastfood(jax.random.key(0), 10, 0)
    ff = fastfood(jax.random.key(0), 10, 3)
    with pytest.raises(ValueError, match="at most L = 4"):
        project(ff, jnp.ones(5))
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(jnp.ones(6))
