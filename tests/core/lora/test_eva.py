"""EVA's pieces: the incremental PCA against the PCA of all rows at once, the redistribution, the resolved config."""

import numpy as np
import pytest

import jlora
from jlora.core.lora import eva
from jlora.errors import ConfigError


def rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    scales = 2.0 ** -np.arange(d)  # a spectrum with gaps: the components are well defined
    return np.random.default_rng(seed).normal(size=(n, d)) * scales + np.arange(d)


def test_incremental_pca_of_every_component_is_the_pca_of_all_rows():
    x = rows(120, 6)
    pca = None
    for batch in np.split(x, 4):
        pca = eva.partial_fit(pca, batch, n_components=6)
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(pca.mean, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(pca.var, x.var(axis=0), rtol=1e-10)
    np.testing.assert_allclose(pca.singular_values, s, rtol=1e-9)
    np.testing.assert_allclose(np.abs(pca.components), np.abs(vt), atol=1e-9)
    np.testing.assert_allclose(pca.ratios, s**2 / (x.var(axis=0).sum() * len(x)), rtol=1e-9)
    assert pca.n_seen == 120
    assert (pca.components[np.arange(6), np.abs(pca.components).argmax(axis=1)] > 0).all()  # svd_flip's signs


def test_truncated_incremental_pca_converges_on_a_spectrum_with_gaps():
    x = rows(400, 8)
    pca, flags = None, None
    for batch in np.split(x, 10):
        fitted = eva.partial_fit(pca, batch, n_components=3)
        flags, pca = eva.converged(pca, fitted, tau=0.99), fitted
    assert flags.all()
    assert not eva.converged(None, pca, tau=0.0).any()  # the first batch has nothing to compare with
    _, _, vt = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
    np.testing.assert_allclose(np.abs((pca.components * vt[:3]).sum(axis=1)), 1.0, atol=1e-3)


def test_redistribute_gives_the_budgets_largest_ratios_to_their_layers():
    ratios = {"a": np.array([0.5, 0.2, 0.1]), "b": np.array([0.4, 0.3, 0.05]), "c": np.array([0.01, 0.0])}
    assert eva.redistribute(ratios, budget=4) == {"a": 2, "b": 2, "c": 0}
    assert eva.redistribute(ratios, budget=1) == {"a": 1, "b": 0, "c": 0}
    assert eva.redistribute({"a": np.array([0.3]), "b": np.array([0.3])}, budget=1) == {"a": 1, "b": 0}  # ties: first


def test_offered_is_round_r_rho_and_refuses_more_than_the_input_has():
    cfg = jlora.LoraConfig(r=4, alpha=8, rank_pattern={"h.1.attn.c_attn": 2}, init="eva", eva={"rho": 1.5})
    paths = ["h.0.attn.c_attn", "h.1.attn.c_attn"]
    assert eva.offered(cfg, paths, dict.fromkeys(paths, 32)) == ({"h.0.attn.c_attn": 6, "h.1.attn.c_attn": 3}, 6)
    with pytest.raises(ConfigError, match=r"h.0.attn.c_attn round\(r \* rho\) = 6 components but its input has 5"):
        eva.offered(cfg, paths, dict.fromkeys(paths, 5))


def test_resolved_config_keeps_the_ranked_layers_with_their_ranks_and_alphas():
    cfg = jlora.LoraConfig(r=4, alpha=8, target_modules=("c_attn", "c_fc"), init="eva")
    ranks = {"h.0.attn.c_attn": 6, "h.0.mlp.c_fc": 4, "h.1.attn.c_attn": 0, "h.1.mlp.c_fc": 2}
    out = eva.resolved(cfg, ranks, 2)
    assert out.module_paths(2) == ("h.0.attn.c_attn", "h.0.mlp.c_fc", "h.1.mlp.c_fc")  # rank 0: no adapter
    assert [out.rank_for(p) for p in out.module_paths(2)] == [6, 4, 2]
    assert [out.scaling_for(p) for p in out.module_paths(2)] == [2.0, 2.0, 2.0]  # alpha * r_new / r: the same scale
    kept = eva.resolved(cfg.replace(eva={"adjust_scaling_factors": False}), ranks, 2)
    assert [kept.alpha_for(p) for p in kept.module_paths(2)] == [8.0, 8.0, 8.0]
    assert eva.resolved(cfg, dict.fromkeys(ranks, 4), 2).target_modules == cfg.target_modules
    with pytest.raises(ConfigError, match="EVA gave every layer rank 0"):
        eva.resolved(cfg, dict.fromkeys(ranks, 0), 2)


def test_whitened_components_are_divided_by_the_root_of_their_singular_values():
    pca = eva.partial_fit(None, rows(50, 4), n_components=3)
    np.testing.assert_allclose(
        eva.components(pca, 2, whiten=True), pca.components[:2] / np.sqrt(pca.singular_values[:2, None])
    )
    np.testing.assert_array_equal(eva.components(pca, 2, whiten=False), pca.components[:2])


def test_eva_settings_are_checked():
    with pytest.raises(ConfigError, match="rho must be >= 1"):
        jlora.LoraConfig(init="eva", eva={"rho": 0.5})
    with pytest.raises(ConfigError, match="tau must be in"):
        jlora.LoraConfig(init="eva", eva={"tau": 2})
    with pytest.raises(ConfigError, match="unknown lora.eva key"):
        jlora.LoraConfig(init="eva", eva={"rank": 2})
    cfg = jlora.LoraConfig(init="eva", eva={"rho": 3, "whiten": True})
    assert jlora.LoraConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="takes A from the inputs of the training data"):
        jlora.init_lora(None, cfg, {})
