"""Plots: PNG files written without pyplot's global state, small enough to commit."""

import warnings

import numpy as np

from jlora.research import plots

PNG = b"\x89PNG\r\n\x1a\n"


def test_every_helper_writes_a_small_png(tmp_path):
    rng = np.random.default_rng(0)
    written = [
        plots.line_plot(
            tmp_path / "a" / "line.png", {"s": ([1, 2, 4], [3.0, 2.0, 1.0])}, xlabel="r", ylabel="y", logx=True
        ),
        plots.panels(tmp_path / "panels.png", [dict(series={"s": ([1, 2], [1.0, 2.0])}, xlabel="x", ylabel="y")] * 2),
        plots.curves(tmp_path / "curves.png", {"a": rng.normal(size=300), "b": rng.normal(size=300)}, window=20),
        plots.heatmaps(tmp_path / "heat.png", {f"m{i}": rng.uniform(size=(8, 64)) for i in range(12)}),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zero singular values (an untrained B) must not reach the log axis
        written.append(plots.spectra(tmp_path / "spectra.png", {"layer 0": {"c_attn": [2.0, 1.0, 0.0, 0.0]}}))
    assert (tmp_path / "a" / "line.png").exists()  # parent folders are made
    for path in written:
        data = path.read_bytes()
        assert data[:8] == PNG and 1_000 < len(data) < 200_000, (path, len(data))


def test_no_pyplot_figures_are_left_open(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    plots.heatmaps(tmp_path / "h.png", {"m": np.eye(3)})
    assert plt.get_fignums() == before
