"""`jlora diagnose RUN_DIR [--against RUN_DIR2]`: what a trained adapter's updates look like.

    jlora diagnose runs/qa                                  # table; runs/qa/diagnose/{diagnose.json, *.png}
    jlora diagnose runs/r8 --against runs/r64 --out diag/   # also phi(i, j) between the two: similarity.png

For every adapted module of the run's newest checkpoint (or ``--step``), from the factors of
dW = scaling * B A (`jlora.core.lora.svd.delta_svd`, no dense dW is formed):

    singular values     s_1 >= ... >= s_r
    energy top k        sum_{i<=k} s_i^2 / sum s_i^2, for k = 1, 2, 4, 8 (up to r)
    effective rank      exp(entropy of s / sum s)        stable rank  ||dW||_F^2 / s_1^2
    ||dW|| / ||W||      Frobenius norms, W the frozen base weight (the columns the adapter updates)
    amplification       ||dW||_F / ||U^T W V^T||_F (LoRA paper, App. H.4)
    intruders           how many of the top k left singular vectors of the adapted weight W' have a
                        best |cosine| below epsilon with every singular vector of W (Shuttleworth et
                        al. 2024; k = 10, epsilon = 0.5 as PEFT's), in intruders.png too

A PiSSA / OLoRA run is read against its original base: dW is the rank-2r update its export
to PEFT holds, s (B A - B0 A0). For DoRA, dW is the direction's update s B A, and W' the
merged weight m * (W + dW) / ||W + dW||.

With ``--against``, for every module both runs adapt, the LoRA paper's normalised subspace
similarity (eq. 4) phi(i, j) = ||U1_i^T U2_j||_F^2 / min(i, j) between the right singular
vectors of the two A matrices, drawn as the paper's heat maps (its figure compares r=8 with r=64).

A run trained with ``telemetry: N`` logged those figures every N steps (`jlora.core.analysis.telemetry`);
their evolution is drawn in ``telemetry.png``: effective rank, top-1 energy, ||dW|| / ||W|| and the
drift phi(1, 1) against N steps before, one line per module, against the step. A population run
holds several adapters: ``--member K`` picks one (``--against-member`` the other run's).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jlora.core.lora.adapter import flatten_adapters, scaling_of
from jlora.core.lora.merge import merge
from jlora.core.lora.svd import delta_svd, module_intruders, subspace_similarity_grid
from jlora.errors import CheckpointError
from jlora.training.records.artifacts import load_run, open_artifact
from jlora.training.records.metrics import read_metrics

TOP = (1, 2, 4, 8)


def diagnose(
    run_dir: str | Path, *, step: int | None = None, member: int | None = None, k: int = 10, epsilon: float = 0.5
) -> dict:
    """The spectrum figures of every adapter of a run, as plain JSON-able values.

    Returns:
      {"run", "step", "lora_config", "intruders": {"k", "epsilon"}, "modules": {path: {"r",
      "scaling", "singular_values" (r,), "energy" (r,), "energy_top": {k: share},
      "effective_rank", "stable_rank", "norm", "relative_norm", "amplification", "intruders",
      "intruder_similarity" (k,)}}}.
    """
    _, params, lora, lora_cfg, meta = load_run(run_dir, step, member=member, original_base=True)
    intruders = module_intruders(params, merge(params, lora), flatten_adapters(lora), k, epsilon)
    scalings = {path: float(scaling_of(a)) for path, a in flatten_adapters(lora).items()}
    modules = {}
    for path, fig in delta_svd(lora, params).items():
        r = int(fig["singular_values"].shape[0])
        energy = np.asarray(fig["energy"], np.float64)
        modules[path] = {
            "r": r,
            "scaling": scalings[path],
            "singular_values": np.asarray(fig["singular_values"], np.float64).tolist(),
            "energy": energy.tolist(),
            "energy_top": {str(k): float(energy[k - 1]) for k in TOP if k <= r},
            **{
                name: float(fig[name])
                for name in ("effective_rank", "stable_rank", "norm", "relative_norm", "amplification")
            },
            "intruders": intruders[path]["intruders"],
            "intruder_similarity": np.asarray(intruders[path]["similarity"], np.float64).tolist(),
        }
    report = {
        "run": str(run_dir),
        "step": meta["step"],
        "lora_config": meta["lora_config"],
        "intruders": {"k": k, "epsilon": epsilon},
        "modules": modules,
    }
    history = telemetry_history(run_dir, member)
    return report if not history else {**report, "telemetry": history}


def telemetry_history(run_dir: str | Path, member: int | None = None) -> dict:
    """The telemetry rows of a run's metrics.jsonl (of population member `member`) as
    {figure: {module: [[step, value], ...]}}, for every scalar figure; {} when the run logged none."""
    history: dict[str, dict[str, list]] = {}
    for row in read_metrics(run_dir):
        if "effective_rank/mean" not in row or row.get("member") != member:
            continue
        for key, value in row.items():
            figure, _, module = key.partition("/")
            if module and isinstance(value, int | float):
                history.setdefault(figure, {}).setdefault(module, []).append([row["step"], value])
    return history


def _adapters(run_dir: str | Path, step: int | None, member: int | None) -> dict:
    return flatten_adapters(open_artifact(run_dir, step=step, member=member).adapters[0].lora)


def compare(
    run_dir: str | Path,
    against: str | Path,
    *,
    step: int | None = None,
    member: int | None = None,
    against_member: int | None = None,
) -> dict:
    """phi(i, j) of the LoRA paper's eq. 4 between the A matrices of two runs, per common module.

    Returns:
      {"run", "against", "modules": {path: {"r1", "r2", "phi": (r1, r2) nested lists,
      "phi_top": phi(1, 1), "phi_full": phi(min r, min r)}}}.
    """
    first, second = _adapters(run_dir, step, member), _adapters(against, None, against_member)
    common = [path for path in first if path in second]
    if not common:
        raise CheckpointError(f"{run_dir} and {against} adapt no module in common")
    modules = {}
    for path in common:
        a1, a2 = np.asarray(first[path]["A"]), np.asarray(second[path]["A"])
        if a1.shape[1] != a2.shape[1]:
            raise CheckpointError(
                f"{path}: the runs' adapters act on inputs of different sizes ({a1.shape[1]}, {a2.shape[1]})"
            )
        phi = np.asarray(subspace_similarity_grid(a1, a2), np.float64)
        k = min(phi.shape) - 1
        modules[path] = {
            "r1": a1.shape[0],
            "r2": a2.shape[0],
            "phi": phi.tolist(),
            "phi_top": float(phi[0, 0]),
            "phi_full": float(phi[k, k]),
        }
    return {"run": str(run_dir), "against": str(against), "modules": modules}


def format_table(report: dict) -> str:
    """The report as aligned text: one row per module (and one per compared module)."""
    tops = [k for k in TOP if any(str(k) in m["energy_top"] for m in report["modules"].values())]
    top_k = report["intruders"]["k"]
    header = [
        "module",
        "r",
        "||dW||",
        "/||W||",
        "amplif.",
        "eff.rank",
        "stable",
        *[f"E@{k}" for k in tops],
        f"intr.@{top_k}",
        "s_1..s_3",
    ]
    rows = []
    for path, m in report["modules"].items():
        rows.append(
            [
                path,
                str(m["r"]),
                f"{m['norm']:.3g}",
                f"{m['relative_norm']:.3g}",
                f"{m['amplification']:.3g}",
                f"{m['effective_rank']:.2f}",
                f"{m['stable_rank']:.2f}",
                *[f"{m['energy_top'][str(k)]:.3f}" if str(k) in m["energy_top"] else "-" for k in tops],
                str(m["intruders"]),
                " ".join(f"{s:.3g}" for s in m["singular_values"][:3]),
            ]
        )
    eps = report["intruders"]["epsilon"]
    title = f"{report['run']} (step {report['step']}; intr.@{top_k}: of the top {top_k} singular vectors of W', "
    lines = [title + f"those with |cos| < {eps} against all of W's)", *_aligned([header, *rows])]
    against = report.get("against")
    if against:
        lines += ["", f"subspace similarity phi(i, j) against {against['against']} (LoRA paper eq. 4, A matrices)"]
        header = ["module", "r1", "r2", "phi(1,1)", "phi(k,k), k=min r"]
        rows = [
            [path, str(m["r1"]), str(m["r2"]), f"{m['phi_top']:.3f}", f"{m['phi_full']:.3f}"]
            for path, m in against["modules"].items()
        ]
        lines += _aligned([header, *rows])
    return "\n".join(lines)


def _aligned(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]


def write_plots(report: dict, out: Path) -> list[Path]:
    """spectrum.png (singular values per layer, one line per module), intruders.png (the best
    similarity of each top-k singular vector of W' with W's, and the intruder count per layer)
    and, with a comparison, similarity.png (the phi(i, j) heat map of each common module)."""
    from jlora.research import plots

    layers: dict[str, dict] = {}
    similarity: dict[str, tuple] = {}
    counts: dict[str, tuple[list, list]] = {}
    for path, m in report["modules"].items():
        layer, _, module = path.partition(".")[2].partition(".")
        layers.setdefault(f"layer {layer}", {})[module] = m["singular_values"]
        similarity[path] = (list(range(1, len(m["intruder_similarity"]) + 1)), m["intruder_similarity"])
        counts.setdefault(module, ([], []))
        counts[module][0].append(int(layer))
        counts[module][1].append(m["intruders"])
    written = [plots.spectra(out / "spectrum.png", layers, title=f"singular values of dW: {report['run']}")]
    k, eps = report["intruders"]["k"], report["intruders"]["epsilon"]
    written.append(
        plots.panels(
            out / "intruders.png",
            [
                dict(
                    series=similarity,
                    hlines={f"epsilon = {eps}": eps},
                    xlabel="i (singular vector of W', by singular value)",
                    ylabel="max |cos| with W's singular vectors",
                    title="below epsilon: an intruder dimension",
                ),
                dict(series=counts, xlabel="layer", ylabel=f"intruders in the top {k}", title="per layer"),
            ],
            title=f"intruder dimensions: {report['run']}",
        )
    )
    against = report.get("against")
    if against:
        grids = {path: np.asarray(m["phi"]) for path, m in against["modules"].items()}
        title = f"phi(i, j): {against['run']} (i) against {against['against']} (j)"
        written.append(plots.heatmaps(out / "similarity.png", grids, xlabel="j", ylabel="i", title=title))
    history = report.get("telemetry")
    if history:
        written.append(plot_telemetry(out / "telemetry.png", history, title=f"dW while training: {report['run']}"))
    return written


TELEMETRY_PANELS = {
    "effective_rank": "effective rank",
    "energy_top1": "energy in the top singular value",
    "relative_norm": "||dW||_F / ||W||_F",
    "phi_top": "phi(1, 1) against N steps before",
}


def plot_telemetry(path: Path, history: dict, *, title: str | None = None) -> Path:
    """The figures of `telemetry_history` against the step: a panel per figure, a line per layer
    (the mean over the layer's adapted modules)."""
    from jlora.research import plots

    specs = []
    for figure, ylabel in TELEMETRY_PANELS.items():
        layers: dict[str, dict[int, list[float]]] = {}
        for module, points in history.get(figure, {}).items():
            if module != "mean":
                for step, value in points:
                    layers.setdefault(f"layer {module.split('.')[1]}", {}).setdefault(step, []).append(value)
        series = {
            name: (list(by_step), [float(np.mean(v)) for v in by_step.values()]) for name, by_step in layers.items()
        }
        if series:
            specs.append(dict(series=series, xlabel="step", ylabel=ylabel, title=ylabel))
    return plots.panels(path, specs, title=title, max_cols=2)
