"""Small PNG plots for the diagnostics and research scripts: pure functions from numbers to a file.

Figures are built on `matplotlib.figure.Figure` and written with its Agg canvas, never through
`pyplot`: no global figure state, no display needed, and nothing to close. Each helper takes
plain Python or numpy data and a path, writes one PNG (small: 100 dpi), and returns the path.

>>> import tempfile, pathlib
>>> path = line_plot(pathlib.Path(tempfile.mkdtemp()) / "loss.png", {"alpha = 2r": ([1, 2, 4], [3.0, 2.5, 2.4])},
...                  xlabel="r", ylabel="loss", logx=True)
>>> path.read_bytes()[:4] == b"\\x89PNG"
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator, ScalarFormatter

DPI = 100


def _save(fig: Figure, path: str | Path, title: str | None = None) -> Path:
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _hide_unused(axes, used: int) -> None:
    for ax in axes[used:]:
        ax.set_visible(False)


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def _axis(ax, xlabel: str, ylabel: str, title: str | None, logx: bool, logy: bool, xticks=None) -> None:
    if logx:  # ranks: powers of two, labelled as plain numbers at the points plotted
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
        if xticks is not None:
            ax.set_xticks(sorted(set(xticks)))
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)


def _lines(ax, spec: Mapping) -> None:
    series = spec["series"]
    for label, (x, y) in series.items():
        ax.plot(x, y, marker="o", markersize=4, label=label)
        for text, xy in zip((spec.get("point_labels") or {}).get(label, ()), zip(x, y)):
            ax.annotate(text, xy, textcoords="offset points", xytext=(4, 4), fontsize=7)
    for i, (label, y) in enumerate((spec.get("hlines") or {}).items()):
        ax.axhline(y, color=f"C{len(series) + i}", linestyle="--", linewidth=1, label=label)
    if spec.get("vline") is not None:
        ax.axvline(spec["vline"], color="gray", linestyle=":", linewidth=1)
    xs = spec.get("xticks", [x for x, _ in series.values() for x in x])  # a log axis labels these (default: every x)
    _axis(ax, spec["xlabel"], spec["ylabel"], spec.get("title"), spec.get("logx", False), spec.get("logy", False), xs)
    if spec.get("legend", True):
        ax.legend(fontsize=8)


def line_plot(
    path: str | Path,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    logx: bool = False,
    logy: bool = False,
    hlines: Mapping[str, float] | None = None,
    vline: float | None = None,
) -> Path:
    """One axis: a line with markers per series {label: (x, y)}, labelled horizontal lines
    `hlines` {label: y}, and a dotted vertical line at `vline`."""
    spec = dict(series=series, xlabel=xlabel, ylabel=ylabel, title=title, logx=logx, logy=logy, hlines=hlines)
    return panels(path, [{**spec, "vline": vline}])


def panels(path: str | Path, plots: Sequence[Mapping], *, title: str | None = None, max_cols: int = 4) -> Path:
    """Axes side by side (up to 4 a row); each entry of `plots` holds one axis's `line_plot` arguments
    (``series``, ``xlabel``, ``ylabel``; optionally ``title``, ``logx``, ``logy``, ``hlines``, ``vline``,
    ``legend`` (default True), ``point_labels`` {series label: a text per point}, ``xticks`` (the x values a
    log axis labels; default every point's))."""
    rows, cols = _grid(len(plots), max_cols)
    fig = Figure(figsize=(5.0 * cols, 3.8 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, spec in zip(axes, plots):
        _lines(ax, spec)
    _hide_unused(axes, len(plots))
    return _save(fig, path, title)


def curves(
    path: str | Path,
    curves: Mapping[str, Sequence[float]],
    *,
    xlabel: str = "step",
    ylabel: str = "training loss",
    title: str | None = None,
    window: int = 1,
    styles: Mapping[str, Mapping] | None = None,
) -> Path:
    """Loss curves {label: (steps,)}, each smoothed by a running mean over `window` steps.

    `styles` gives per-label matplotlib line options (e.g. the same colour for curves whose
    effective learning rate is the same).
    """
    fig = Figure(figsize=(6.5, 4.0), layout="constrained")
    ax = fig.subplots()
    for label, y in curves.items():
        y = np.asarray(y, np.float64)
        w = max(1, min(window, y.size))
        smooth = np.convolve(y, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(w, y.size + 1), smooth, label=label, linewidth=1.2, **(styles or {}).get(label, {}))
    _axis(ax, xlabel, ylabel, title, False, False)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axis: curves stay visible
    return _save(fig, path)


def spectra(
    path: str | Path,
    groups: Mapping[str, Mapping[str, Sequence[float]]],
    *,
    title: str | None = None,
) -> Path:
    """Singular values by index, one axis per group (a layer), one line per member (a module).

    Zero singular values (an adapter whose B is still 0) have no place on the log scale and
    are left out.
    """
    rows, cols = _grid(len(groups))
    fig = Figure(figsize=(3.4 * cols, 2.8 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, (name, members) in zip(axes, groups.items()):
        for label, s in members.items():
            s = np.asarray(s, np.float64)
            index = np.arange(1, s.size + 1)
            keep = s > 0
            ax.plot(index[keep], s[keep], marker="o", markersize=3, linewidth=1, label=label)
        _axis(ax, "i", "singular value", name, False, True)
        ax.legend(fontsize=7)
    _hide_unused(axes, len(groups))
    return _save(fig, path, title)


def heatmaps(
    path: str | Path,
    grids: Mapping[str, np.ndarray],
    *,
    xlabel: str = "j",
    ylabel: str = "i",
    title: str | None = None,
    vmax: float = 1.0,
    label: str = "phi(i, j)",
    column_labels: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
) -> Path:
    """One heat map per entry {name: (n_i, n_j) values in [0, vmax]}, row i from the top, as in the
    LoRA paper's subspace-similarity figure; i and j count from 1 (`row_labels`, `column_labels`: the axes'
    names instead)."""
    rows, cols = _grid(len(grids))
    fig = Figure(figsize=(3.4 * cols, 3.0 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    image = None
    for ax, (name, grid) in zip(axes, grids.items()):
        grid = np.asarray(grid, np.float64)
        n_i, n_j = grid.shape
        extent = (0.5, n_j + 0.5, n_i + 0.5, 0.5)
        image = ax.imshow(grid, vmin=0.0, vmax=vmax, aspect="auto", extent=extent, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        if column_labels is not None:
            ax.set_xticks(range(1, n_j + 1), column_labels, rotation=45, ha="right", fontsize=7)
        if row_labels is not None:
            ax.set_yticks(range(1, n_i + 1), row_labels, fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    _hide_unused(axes, len(grids))
    if image is not None:
        fig.colorbar(image, ax=list(axes[: len(grids)]), shrink=0.8, label=label)
    return _save(fig, path, title)


def search_plot(
    path: str | Path,
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    pruned: Mapping[str, tuple[float, float]],
    best: str,
    rungs: Sequence[int],
    ylabel: str,
    ranks: Mapping[str, tuple[float, int]] | None = None,
    title: str | None = None,
) -> Path:
    """A search's picture: each member's curve {label: (steps, values)}, thin, with an x where it was
    pruned (`pruned` {label: (step, value)}), the `best` one bold, dotted lines at the `rungs`; beside
    it, with `ranks` {module: (effective rank, r)}, the winner's effective rank per module against r."""
    fig = Figure(figsize=(13.0 if ranks else 8.0, 4.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, 2 if ranks else 1, width_ratios=[2, 1] if ranks else None))
    ax = axes[0]
    for i, (label, (x, y)) in enumerate(curves.items()):
        if label == best:
            continue
        ax.plot(x, y, color=f"C{i % 10}", linewidth=0.9, alpha=0.55)
        if label in pruned:
            ax.plot(*pruned[label], marker="x", color=f"C{i % 10}", markersize=6)
    if best in curves:
        ax.plot(*curves[best], color="black", linewidth=2.4, marker="o", markersize=4, label=f"best: {best}")
    for step in rungs:
        ax.axvline(step, color="gray", linestyle=":", linewidth=1)
    ax.plot([], [], "x", color="gray", label="pruned at a rung")
    _axis(ax, "step", ylabel, "every member's validation curve (dotted: rungs)", False, False)
    ax.legend(fontsize=8)
    if ranks:
        names = list(ranks)
        y = np.arange(len(names))
        bars = axes[1]
        bars.barh(y, [ranks[n][0] for n in names], color="C0", label="effective rank of dW")
        bars.scatter([ranks[n][1] for n in names], y, color="black", marker="|", s=120, label="r", zorder=3)
        bars.set_yticks(y, names, fontsize=7)
        bars.invert_yaxis()
        bars.set_xlabel("effective rank")
        bars.set_title("the winner's update, per module", fontsize=10)
        bars.grid(True, axis="x", alpha=0.3)
        bars.legend(fontsize=8, loc="lower right")
    return _save(fig, path, title)
