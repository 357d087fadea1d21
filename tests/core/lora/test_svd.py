"""SVD diagnostics of dW = scaling * B A against numpy's dense SVD of the dense dW (float64)."""

import jax
import numpy as np
import pytest

import jlora
from jlora.core.lora.adapter import flatten_adapters, output_columns, split_slice
from jlora.tree import get_path


def random_adapter(seed, r, d_in, d_out, decay=1.0):
    """A, B (numpy float32) with a spread spectrum (B's columns scaled by decay**k)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(r, d_in)) / np.sqrt(d_in)
    b = rng.normal(size=(d_out, r)) * decay ** np.arange(r)
    return a.astype(np.float32), b.astype(np.float32)


def dense_figures(delta):
    """Every figure computed by hand from numpy's float64 SVD of the dense update."""
    s = np.linalg.svd(delta, compute_uv=False)
    power = s**2
    p = s / s.sum()
    p = p[p > 0]
    return s, {
        "energy": np.cumsum(power) / power.sum(),
        "effective_rank": np.exp(-(p * np.log(p)).sum()),
        "stable_rank": np.linalg.norm(delta, "fro") ** 2 / s[0] ** 2,
        "norm": np.linalg.norm(delta, "fro"),
    }


def numpy_amplification(w, delta, r):
    """||dW||_F / ||U^T W V^T||_F with U, V from numpy's dense SVD of dW (the paper's recipe)."""
    u, _, vt = np.linalg.svd(delta)
    return np.linalg.norm(delta, "fro") / np.linalg.norm(u[:, :r].T @ w @ vt[:r].T, "fro")


@pytest.mark.parametrize("r, d_in, d_out, scaling", [(4, 24, 40, 2.0), (8, 32, 96, 0.5), (3, 50, 7, 1.0)])
def test_factored_svd_matches_dense_numpy(r, d_in, d_out, scaling):
    a, b = random_adapter(r, r, d_in, d_out, decay=0.6)
    delta = scaling * np.asarray(b, np.float64) @ np.asarray(a, np.float64)
    u, s, vt = jlora.factored_svd(a, b, scaling)
    expected, _ = dense_figures(delta)
    assert u.shape == (d_out, r) and s.shape == (r,) and vt.shape == (r, d_in)
    np.testing.assert_allclose(s, expected[:r], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(u) * np.asarray(s) @ np.asarray(vt), delta, atol=1e-5 * expected[0])
    np.testing.assert_allclose(np.asarray(u).T @ np.asarray(u), np.eye(r), atol=1e-5)
    np.testing.assert_allclose(np.asarray(vt) @ np.asarray(vt).T, np.eye(r), atol=1e-5)


@pytest.fixture(scope="module")
def tiny_params(tiny_hf):
    return jlora.load_gpt2(tiny_hf[0])[1]


def tiny_model(params, **lora_kwargs):
    cfg = jlora.LoraConfig(r=4, alpha=8, **lora_kwargs)
    return params, jlora.init_lora(jax.random.key(0), cfg, params), cfg


@pytest.mark.parametrize(
    "lora_kwargs",
    [dict(), dict(target_modules=("c_attn.q", "c_attn.v", "mlp.c_proj"), rank_pattern={"c_proj": 2}, rslora=True)],
)
def test_delta_svd_figures_match_dense_numpy(random_b, tiny_params, lora_kwargs):
    params, lora, cfg = tiny_model(tiny_params, **lora_kwargs)
    lora = random_b(lora, scale=1.0, decay=0.7)
    report = jlora.delta_svd(lora, params)
    assert list(report) == list(flatten_adapters(lora))
    for path, ad in flatten_adapters(lora).items():
        r = ad["A"].shape[0]
        delta = cfg.scaling_for(path) * np.asarray(ad["B"], np.float64) @ np.asarray(ad["A"], np.float64)
        s, figures = dense_figures(delta)
        got = report[path]
        assert got["singular_values"].shape == (r,)
        np.testing.assert_allclose(got["singular_values"], s[:r], rtol=1e-5)
        np.testing.assert_allclose(got["energy"], figures["energy"][:r], rtol=1e-5)
        assert float(got["energy"][-1]) == pytest.approx(1.0, abs=1e-6)  # rank <= r: the top r hold it all
        for name in ("effective_rank", "stable_rank", "norm"):
            np.testing.assert_allclose(got[name], figures[name], rtol=1e-5, err_msg=f"{path} {name}")
        # W in the maths' layout is the transpose of the kernel's adapted columns
        kernel = np.asarray(get_path(params, split_slice(path)[0])["kernel"], np.float64)
        w = kernel[:, output_columns(path, kernel.shape[1])].T
        np.testing.assert_allclose(got["relative_norm"], figures["norm"] / np.linalg.norm(w), rtol=1e-5)
        np.testing.assert_allclose(got["amplification"], numpy_amplification(w, delta, r), rtol=1e-4)


def test_energy_and_ranks_by_hand():
    fig = jlora.spectrum(np.array([3.0, 2.0, 1.0]))
    np.testing.assert_allclose(fig["energy"], [9 / 14, 13 / 14, 1.0], rtol=1e-6)
    p = np.array([3, 2, 1]) / 6
    np.testing.assert_allclose(fig["effective_rank"], np.exp(-(p * np.log(p)).sum()), rtol=1e-6)
    np.testing.assert_allclose(fig["stable_rank"], 14 / 9, rtol=1e-6)
    np.testing.assert_allclose(fig["norm"], np.sqrt(14), rtol=1e-6)
    flat = jlora.spectrum(np.ones(4))  # equal singular values: effective and stable rank both = 4
    np.testing.assert_allclose([flat["effective_rank"], flat["stable_rank"]], [4.0, 4.0], rtol=1e-6)


def test_zero_b_at_initialisation_gives_no_nans(tiny_params):
    params, lora, cfg = tiny_model(tiny_params, target_modules=("c_attn", "mlp.c_fc"))
    report = jlora.delta_svd(lora, params)  # B = 0: dW = 0 everywhere
    for fig in report.values():
        assert all(np.isfinite(np.asarray(v)).all() for v in fig.values())
        np.testing.assert_array_equal(fig["singular_values"], np.zeros(4))
        np.testing.assert_array_equal(fig["energy"], np.ones(4))
        for name in ("effective_rank", "stable_rank", "norm", "relative_norm", "amplification"):
            assert float(fig[name]) == 0.0, name


def test_delta_svd_without_params_and_under_jit(random_b, tiny_params):
    params, lora, cfg = tiny_model(tiny_params)
    lora = random_b(lora, scale=1.0, decay=0.7)
    plain = jlora.delta_svd(lora)
    assert sorted(plain["h.0.attn.c_attn"]) == ["effective_rank", "energy", "norm", "singular_values", "stable_rank"]
    jitted = jax.jit(jlora.delta_svd)(lora, params)
    for path, fig in plain.items():
        for name, value in fig.items():
            np.testing.assert_allclose(jitted[path][name], value, rtol=1e-6)


def test_amplification_function_matches_numpy():
    a, b = random_adapter(3, 4, 30, 20, decay=0.5)
    w = np.random.default_rng(9).normal(size=(20, 30))
    delta = 2.0 * np.asarray(b, np.float64) @ np.asarray(a, np.float64)
    np.testing.assert_allclose(jlora.amplification(w, a, b, 2.0), numpy_amplification(w, delta, 4), rtol=1e-4)


def numpy_phi(a1, a2, i, j):
    """Eq. 4 straight from its definition, numpy float64."""
    u1 = np.linalg.svd(np.asarray(a1, np.float64))[2][:i].T
    u2 = np.linalg.svd(np.asarray(a2, np.float64))[2][:j].T
    return np.linalg.norm(u1.T @ u2, "fro") ** 2 / min(i, j)


def test_subspace_similarity_against_numpy_and_its_bounds():
    a8, _ = random_adapter(0, 8, 64, 16)
    a64, _ = random_adapter(1, 64, 64, 16)
    a2, _ = random_adapter(2, 2, 64, 16)
    for i in (1, 4, 8):
        assert float(jlora.subspace_similarity(a8, a8, i, i)) == pytest.approx(1.0, abs=1e-5)
    for i, j in [(1, 1), (8, 64), (3, 10), (8, 1)]:
        phi = float(jlora.subspace_similarity(a8, a64, i, j))
        assert 0.0 <= phi <= 1.0
        assert phi == pytest.approx(numpy_phi(a8, a64, i, j), abs=1e-5)
    assert float(jlora.subspace_similarity(a8, a64, 8, 64)) == pytest.approx(1.0, abs=1e-5)  # R^64 contains all
    grid = np.asarray(jlora.subspace_similarity_grid(a2, a8))
    assert grid.shape == (2, 8)
    expected = [[numpy_phi(a2, a8, i, j) for j in range(1, 9)] for i in range(1, 3)]
    np.testing.assert_allclose(grid, expected, atol=1e-5)
    orthogonal = np.eye(4, 64, dtype=np.float32), np.eye(4, 64, k=4, dtype=np.float32)
    assert float(jlora.subspace_similarity(*orthogonal, 4, 4)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="1 <= i <= 8"):
        jlora.subspace_similarity(a8, a2, 9, 1)


@pytest.mark.parametrize("r, scaling", [(1, 1.0), (4, 2.0), (8, 0.25)])
def test_lora_from_delta_is_eckart_young(r, scaling):
    rng = np.random.default_rng(r)
    d_out, d_in = 24, 40  # a full-rank update whose spectrum decays
    delta = (rng.normal(size=(d_out, 24)) * 0.8 ** np.arange(24)) @ rng.normal(size=(24, d_in)) / 6
    adapter, kept = jlora.lora_from_delta(delta.astype(np.float32), r, scaling=scaling)
    assert adapter["A"].shape == (r, d_in) and adapter["B"].shape == (d_out, r)
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    best = (u[:, :r] * s[:r]) @ vt[:r]
    approx = scaling * np.asarray(adapter["B"], np.float64) @ np.asarray(adapter["A"], np.float64)
    np.testing.assert_allclose(approx, best, atol=1e-5 * s[0])
    assert float(kept) == pytest.approx((s[:r] ** 2).sum() / (s**2).sum(), rel=1e-5)
    # and the residual's energy is what was not kept
    residual = np.linalg.norm(delta - approx, "fro") ** 2 / np.linalg.norm(delta, "fro") ** 2
    assert residual == pytest.approx(1 - float(kept), abs=1e-5)
    # back through the factored SVD: the same top-r spectrum
    np.testing.assert_allclose(jlora.factored_svd(adapter["A"], adapter["B"], scaling)[1], s[:r], rtol=1e-5)


def test_lora_from_delta_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank must be an integer in 1..3"):
        jlora.lora_from_delta(np.ones((3, 5)), 4)


def numpy_intruders(w_base, w_tuned, k=10, epsilon=0.5):
    """Intruder dimensions by the definition, in float64: (count, best |cos| of each top-k vector of W')."""
    u_base = np.linalg.svd(np.asarray(w_base, np.float64), full_matrices=False)[0]
    u_tuned = np.linalg.svd(np.asarray(w_tuned, np.float64), full_matrices=False)[0][:, :k]
    sim = np.abs(u_tuned.T @ u_base).max(axis=1)
    return int(np.sum(sim < epsilon)), sim


def test_intruders_match_dense_numpy(random_b, tiny_params):
    """Small updates leave W's singular vectors in place; a large random one on c_fc plants intruders."""
    cfg = jlora.LoraConfig(r=4, alpha=8, target_modules=("c_attn", "mlp.c_fc"))
    lora = random_b(jlora.init_lora(jax.random.key(0), cfg, tiny_params), scale=1e-4)
    lora["h"]["1"]["mlp"]["c_fc"] = random_b(lora["h"]["1"]["mlp"]["c_fc"], seed=3, scale=3.0)
    tuned = jlora.merge(tiny_params, lora)
    paths = list(flatten_adapters(lora)) + ["h.0.attn.c_attn.v"]  # a slice of a module: its own columns
    report = jlora.module_intruders(tiny_params, tuned, paths)
    counts = {}
    for path in paths:
        module = split_slice(path)[0]
        before, after = (np.asarray(get_path(t, module)["kernel"]) for t in (tiny_params, tuned))
        cols = output_columns(path, before.shape[1])
        count, sim = numpy_intruders(before[:, cols].T, after[:, cols].T)
        assert report[path]["intruders"] == count and report[path]["similarity"].shape == (10,)
        np.testing.assert_allclose(report[path]["similarity"], sim, atol=1e-4)
        counts[path] = count
    assert counts["h.1.mlp.c_fc"] > 0 and counts["h.0.attn.c_attn"] == 0  # the test tells the two apart
    count, same = jlora.intruder_dimensions(before, before, k=40)  # a (32, 32) weight against itself
    assert count == 0 and same.shape == (32,)
    np.testing.assert_allclose(same, 1.0, atol=1e-4)
    with pytest.raises(ValueError, match="k >= 1"):
        jlora.intruder_dimensions(before, after, k=0)
