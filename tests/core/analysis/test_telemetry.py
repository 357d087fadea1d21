"""Telemetry from the factors against dense float64 numpy; a zero-padded adapter gives its own figures."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.core.analysis.telemetry import adapter_figures, telemetry_row
from jlora.core.update.population import pad_lora


def tree(a, b, scaling=None):
    adapter = {"A": a, "B": b} if scaling is None else {"A": a, "B": b, "scaling": scaling}
    return {"h": {"0": {"mlp": {"c_fc": adapter}}}}


def test_figures_against_numpy_and_padding_changes_none():
    keys = jax.random.split(jax.random.key(0), 4)
    a, b = jax.random.normal(keys[0], (3, 10)), jax.random.normal(keys[1], (16, 3)) * jnp.array([1.0, 0.5, 0.1])
    a0, b0 = a + 0.3 * jax.random.normal(keys[2], a.shape), b + 0.3 * jax.random.normal(keys[3], b.shape)
    path, scaling, w_norm = "h.0.mlp.c_fc", 1.5, 7.0
    rows = []
    for lora, before in (
        (tree(a, b, scaling), tree(a0, b0)),
        (pad_lora(tree(a, b, scaling), {path: 6}), pad_lora(tree(a0, b0), {path: 6})),
    ):
        figures = adapter_figures(lora, before, {path: w_norm})
        assert figures[path]["singular_values"].shape == (lora["h"]["0"]["mlp"]["c_fc"]["A"].shape[0],)
        rows.append(telemetry_row(figures, {path: 3}))
    assert rows[0].keys() == rows[1].keys()
    for key, value in rows[0].items():
        np.testing.assert_allclose(rows[1][key], value, rtol=1e-5, atol=1e-7, err_msg=key)

    dw = scaling * np.asarray(b, np.float64) @ np.asarray(a, np.float64)
    _, s, vt = np.linalg.svd(dw)
    vt0 = np.linalg.svd(scaling * np.asarray(b0, np.float64) @ np.asarray(a0, np.float64))[2]
    s, p = s[:3], s[:3] / s[:3].sum()
    row = rows[0]
    np.testing.assert_allclose(row[f"singular_values/{path}"], s, rtol=1e-5)
    assert row[f"energy_top2/{path}"] == pytest.approx(np.sum(s[:2] ** 2) / np.sum(s**2), rel=1e-5)
    assert row[f"effective_rank/{path}"] == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-5)
    assert row[f"relative_norm/{path}"] == pytest.approx(np.linalg.norm(dw) / w_norm, rel=1e-5)
    assert row[f"phi_top/{path}"] == pytest.approx((vt[0] @ vt0[0]) ** 2, rel=1e-4)
    assert row[f"phi_full/{path}"] == pytest.approx(np.sum((vt[:3] @ vt0[:3].T) ** 2) / 3, rel=1e-4)
    assert row["effective_rank/mean"] == row[f"effective_rank/{path}"] and "energy_top4/mean" not in row


def test_no_phi_against_a_zero_update():
    a = jnp.ones((2, 4))
    figures = adapter_figures(tree(a, jnp.ones((5, 2)), 1.0), tree(a, jnp.zeros((5, 2))), {"h.0.mlp.c_fc": 1.0})
    row = telemetry_row(figures, {"h.0.mlp.c_fc": 2})
    assert "phi_top/mean" not in row and row["norm/mean"] == pytest.approx(np.sqrt(80.0))  # dW = 2 everywhere, 5 x 4
    assert "phi_top/mean" not in telemetry_row(figures, {"h.0.mlp.c_fc": 2}, with_phi=False)
