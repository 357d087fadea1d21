"""What a search found and why: the leaderboard, every member's curve, the winner's update, the source's heuristics.

    report = search_report("runs/search")   # from RUN_DIR's summary.json, metrics.jsonl and newest checkpoint
    write_report("runs/search")              # RUN_DIR/search/{leaderboard.md, leaderboard.json, search.png};
                                             # summary.json's "search" gets the report too

`jlora train` writes it at the end of a run with a ``search:`` section (`jlora.training.run.search`)::

    leaderboard   a row per member, best first (by how far it got, then by its metric where it stopped):
                  r, alpha (and the source's preset: alpha = r conservative, 2r standard, 4r aggressive),
                  lr, scaling, effective lr = lr * alpha / r, trainable parameters, the metric at every
                  rung it reached, the steps it trained, the rung that pruned it
    winner        per adapted module, the effective rank and top-k energy of its dW = scaling * B A, from
                  the factors (`jlora.core.lora.svd.delta_svd`)
    heuristics    one line per rule of the source, answered from this search: alpha = 2r against r and 4r
                  at the best r; the best r at this data size against the source's table; whether members
                  with equal lr * alpha / r ended close

Members pruned at different rungs are compared where both were measured: at the last step both
reached. A member's metric at a rung is what ranked it there (summary.json's rungs).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from jlora.core.lora.adapter import flatten_adapters
from jlora.core.lora.config import effective_lr, scaling
from jlora.core.lora.svd import delta_svd
from jlora.core.update.population import Member
from jlora.errors import CheckpointError
from jlora.research import plots
from jlora.training.records.checkpoint import find_checkpoint, load_adapter
from jlora.training.records.metrics import read_metrics

PRESETS = {1.0: "conservative", 2.0: "standard", 4.0: "aggressive"}  # alpha / r, as the source names them
SOURCE_RANKS = ((1_000, 8), (10_000, 16), (100_000, 32))  # training examples -> the source's r (its VC table)
TOP = (1, 2, 4, 8)


def preset(r: int, alpha: float) -> str:
    """The source's name for alpha / r: conservative (1), standard (2), aggressive (4), else ''.

    >>> preset(8, 16.0), preset(8, 8.0), preset(8, 12.0)
    ('standard', 'conservative', '')
    """
    return PRESETS.get(alpha / r, "")


def source_rank(n_examples: int) -> str:
    """The r the source recommends for `n_examples` training examples: 4-8 below 1K, else the nearest row
    (on a log scale) of its table r=8 ~1K, r=16 ~10K, r=32 ~100K, and 32-64 well above 100K.

    >>> source_rank(500), source_rank(1000), source_rank(20_000), source_rank(10**6)
    ('4-8', '8', '16', '32-64')
    """
    if n_examples < 1_000:
        return "4-8"
    if n_examples > 100_000 * math.sqrt(10):
        return "32-64"
    return str(min(SOURCE_RANKS, key=lambda row: abs(math.log10(n_examples / row[0])))[1])


def leaderboard(search: Mapping, specs: Sequence[Member], counts: Sequence[int]) -> list[dict]:
    """A row per member (module doc), best first; `counts` are the members' trainable parameters."""
    metric = search["metric"]
    decisions = [*search["rungs"], *([search["final"]] if search.get("final") else [])]
    at: dict[int, dict[int, float]] = {k: {} for k in range(len(specs))}
    place: dict[int, tuple[int, int]] = {}
    for record in decisions:
        for i, (k, value) in enumerate(zip(record["ranking"], record[metric])):
            at[k][record["step"]] = value
            place[k] = (-record["step"], i)  # the last decision a member took part in, and where it stood
    pruned_at = {k: r["step"] for r in search["rungs"] for k in r["pruned"]}
    rows = []
    for k in sorted(range(len(specs)), key=lambda k: place.get(k, (0, k))):
        m = specs[k]
        rows.append(
            {
                "member": k,
                "name": m.name,
                "r": m.lora.r,
                "alpha": m.lora.alpha,
                "preset": preset(m.lora.r, m.lora.alpha),
                "rslora": m.lora.rslora,
                "lr": m.lr,
                "loraplus_ratio": m.loraplus_ratio,
                "seed": m.seed,
                "scaling": scaling(m.lora),
                "effective_lr": effective_lr(m.lr, m.lora),
                "trainable_params": counts[k],
                metric: at[k],
                "steps_trained": search["steps_trained"][k],
                "pruned_at": pruned_at.get(k),
            }
        )
    for i, row in enumerate(rows, 1):
        row["place"] = i
    return rows


def last_common(rows: Sequence[Mapping], metric: str) -> tuple[int, list[float]]:
    """(the last step every one of `rows` was measured at, their metric there)."""
    step = min(max(row[metric]) for row in rows)
    return step, [row[metric][step] for row in rows]


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def alpha_presets(rows: Sequence[Mapping], metric: str, higher_is_better: bool) -> dict:
    """alpha = 2r (standard) against r (conservative) and 4r (aggressive), at the winner's r and other settings."""
    best = rows[0]
    same = lambda row: all(row[key] == best[key] for key in ("r", "lr", "seed", "rslora", "loraplus_ratio"))  # noqa: E731
    group = {row["preset"]: row for row in rows if same(row) and row["preset"]}
    claim = "alpha = 2r is the standard choice (r conservative, 4r aggressive)"
    where = f"r={best['r']}, lr {best['lr']:g}"
    if len(group) < 2:
        tried = ", ".join(f"alpha={row['alpha']:g}" for row in rows if same(row))
        return {"claim": claim, "line": f"alpha presets at the best r ({where}): only {tried} in the grid; not tested"}
    named = [group[p] for p in ("standard", "conservative", "aggressive") if p in group]
    step, values = last_common(named, metric)
    ranked = sorted(zip(values, (row["preset"] for row in named)), reverse=higher_is_better)
    times = {"standard": "2r", "conservative": "r", "aggressive": "4r"}
    figures = ", ".join(f"alpha={times[row['preset']]} ({row['preset']}) {_fmt(v)}" for row, v in zip(named, values))
    if ranked[0][1] == "standard":
        verdict = "alpha = 2r was the best of them"
    elif "standard" in group:
        gap = abs(ranked[0][0] - dict((p, v) for v, p in ranked)["standard"])
        verdict = f"{ranked[0][1]} beat alpha = 2r by {_fmt(gap)}"
    else:
        verdict = f"{ranked[0][1]} was the best (no alpha = 2r member at this r)"
    line = f"alpha presets at the best r ({where}), {metric} at step {step}: {figures}: {verdict}"
    return {"claim": claim, "line": line, "step": step, "values": {p: v for v, p in ranked}, "best": ranked[0][1]}


def rank_for_data(rows: Sequence[Mapping], metric: str, n_examples: int) -> dict:
    """The best r of this search (the winner's, and the best member at each r) against the source's table."""
    per_r: dict[int, Mapping] = {}
    for row in rows:  # rows are best first: the first row of each r is its best member
        per_r.setdefault(row["r"], row)
    by_r = [per_r[r] for r in sorted(per_r)]
    step, values = last_common(by_r, metric)
    best_r, recommended = rows[0]["r"], source_rank(n_examples)
    low, _, high = recommended.partition("-")
    agrees = int(low) <= best_r <= int(high or low)
    figures = ", ".join(f"r={row['r']} {_fmt(v)}" for row, v in zip(by_r, values))
    line = (
        f"best r at {n_examples:,} training examples: r={best_r} (the winner; the best member of each r, {metric} "
        f"at step {step}: {figures}); the source's table says r = {recommended}: "
        + ("agrees" if agrees else "disagrees")
    )
    claim = "small data wants small r (< 1K: 4-8, ~1K: 8, ~10K: 16, ~100K: 32)"
    return {"claim": claim, "line": line, "best_r": best_r, "source_r": recommended, "agrees": agrees}


def equal_effective_lr(rows: Sequence[Mapping], metric: str) -> dict:
    """Do members with equal lr * alpha / r end close? Mean |difference| of the metric, at the last step
    both members of a pair reached, over pairs with equal products against pairs with different ones."""
    claim = "the effective learning rate lr * alpha / r is what matters"
    equal, unequal = [], []
    for a, b in itertools.combinations(rows, 2):
        _, (x, y) = last_common([a, b], metric)
        same = math.isclose(a["effective_lr"], b["effective_lr"], rel_tol=1e-9)
        (equal if same else unequal).append(abs(x - y))
    if not equal:
        return {"claim": claim, "line": "equal lr * alpha / r: no two members share an effective lr; not tested"}
    mean_equal, mean_unequal = float(np.mean(equal)), float(np.mean(unequal)) if unequal else float("nan")
    close = mean_equal < mean_unequal
    line = (
        f"equal lr * alpha / r: {len(equal)} pair(s) of members differ by {_fmt(mean_equal)} in {metric} on average "
        f"(at the last step both reached), pairs with different products by {_fmt(mean_unequal)} "
        f"({len(unequal)} pairs): " + ("equal products ended closer" if close else "equal products did not end closer")
    )
    return {"claim": claim, "line": line, "equal": mean_equal, "unequal": mean_unequal, "closer": close}


def winner_update(lora: Mapping, spec: Member) -> dict:
    """{module: {"r", "effective_rank", "energy_top": {k: share}}} of the winner's dW, from its factors."""
    out = {}
    for path, fig in delta_svd(lora).items():
        r = spec.lora.rank_for(path)
        energy = np.asarray(fig["energy"], np.float64)
        out[path] = {
            "r": r,
            "effective_rank": float(fig["effective_rank"]),
            "energy_top": {str(k): float(energy[k - 1]) for k in TOP if k <= r},
        }
    return out


def search_report(run_dir: str | Path) -> dict:
    """The report of a finished search in `run_dir` (module doc), as JSON-able values."""
    run_dir = Path(run_dir)
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    search = summary.get("search")
    if not search or search.get("best") is None:
        raise CheckpointError(f"{run_dir} holds no finished search (summary.json names no best member)")
    best, metric = search["best"], search["metric"]
    lora, base_leaves, meta = load_adapter(find_checkpoint(run_dir), member=best)
    specs = [Member.from_dict(m) for m in meta["population"]]
    shapes = {path: (a["A"].shape[1], a["B"].shape[0]) for path, a in flatten_adapters(lora).items()}
    base = sum(int(np.size(x)) for x in _leaves(base_leaves))
    counts = [sum(m.lora.rank_for(p) * (i + o) for p, (i, o) in shapes.items()) + base for m in specs]
    rows = leaderboard(search, specs, counts)
    higher = search["higher_is_better"]
    return {
        "metric": metric,
        "higher_is_better": higher,
        "best": best,
        "leaderboard": rows,
        "winner": {"member": best, "name": specs[best].name, "modules": winner_update(lora, specs[best])},
        "heuristics": [
            alpha_presets(rows, metric, higher),
            rank_for_data(rows, metric, search["train_examples"]),
            equal_effective_lr(rows, metric),
        ],
        "rungs": [r["step"] for r in search["rungs"]],
        "member_steps": search["member_steps"],
    }


def _leaves(tree) -> list:
    if isinstance(tree, Mapping):
        return [x for v in tree.values() for x in _leaves(v)]
    return [] if tree is None else [tree]


def markdown(report: Mapping) -> str:
    """leaderboard.md: the table, the winner's update, the heuristic lines."""
    metric = report["metric"]
    rungs = [*report["rungs"], max(max(row[metric]) for row in report["leaderboard"])]
    head = ["place", "member", "r", "alpha", "preset", "lr", "scaling", "lr*alpha/r", "trainable", "steps", "pruned at"]
    head += [f"{metric} @ {s}" for s in rungs]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in report["leaderboard"]:
        cells = [row["place"], f"{row['member']} `{row['name']}`", row["r"], f"{row['alpha']:g}", row["preset"]]
        cells += [f"{row['lr']:g}", f"{row['scaling']:g}", f"{row['effective_lr']:.3g}", f"{row['trainable_params']:,}"]
        cells += [row["steps_trained"], row["pruned_at"] or ""]
        cells += [_fmt(row[metric][s]) if s in row[metric] else "" for s in rungs]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    winner = report["winner"]
    out = [f"# Search: {len(report['leaderboard'])} members, best {winner['member']} `{winner['name']}`", ""]
    out += ["Ranked by how far each member got, then by its " + metric + " where it stopped.", "", *lines, ""]
    out += [f"## The winner's update (dW = scaling * B A of member {winner['member']})", ""]
    out += ["| module | r | effective rank | " + " | ".join(f"top-{k} energy" for k in TOP) + " |"]
    out += ["|" + " --- |" * (3 + len(TOP))]
    for path, fig in winner["modules"].items():
        energy = [_fmt(fig["energy_top"][str(k)]) if str(k) in fig["energy_top"] else "" for k in TOP]
        out.append(f"| {path} | {fig['r']} | {fig['effective_rank']:.3g} | " + " | ".join(energy) + " |")
    out += ["", "## The source's heuristics, answered by this search", ""]
    out += [f"- {h['claim']}: {h['line']}" for h in report["heuristics"]]
    return "\n".join(out) + "\n"


def plot(run_dir: str | Path, report: Mapping, path: str | Path) -> Path:
    """search.png: every member's validation curve against steps, its pruning marked, the winner drawn bold;
    beside it the winner's effective rank per module."""
    metric = report["metric"]
    curves: dict[int, tuple[list, list]] = {}
    for row in read_metrics(run_dir):
        if metric in row and "member" in row:
            x, y = curves.setdefault(row["member"], ([], []))
            x.append(row["step"])
            y.append(row[metric])
    names = {row["member"]: row["name"] for row in report["leaderboard"]}
    pruned = {
        row["name"]: (row["pruned_at"], row[metric][row["pruned_at"]])
        for row in report["leaderboard"]
        if row["pruned_at"]
    }
    winner = report["winner"]
    return plots.search_plot(
        path,
        {names[k]: curves[k] for k in sorted(curves)},
        pruned=pruned,
        best=names[winner["member"]],
        rungs=report["rungs"],
        ylabel=metric,
        ranks={p: (fig["effective_rank"], fig["r"]) for p, fig in winner["modules"].items()},
        title=f"successive halving over {len(names)} members: best {winner['name']}",
    )


def write_report(run_dir: str | Path) -> list[Path]:
    """RUN_DIR/search/{leaderboard.md, leaderboard.json, search.png}, and the report in summary.json's search."""
    run_dir = Path(run_dir)
    report = search_report(run_dir)
    out = run_dir / "search"
    out.mkdir(exist_ok=True)
    (out / "leaderboard.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "leaderboard.md").write_text(markdown(report))
    picture = plot(run_dir, report, out / "search.png")
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["search"]["report"] = {k: report[k] for k in ("leaderboard", "winner", "heuristics")}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return [out / "leaderboard.md", out / "leaderboard.json", picture]
