"""Every way of choosing r, compared at one trainable-parameter budget.

    python scripts/rank_allocation.py --quick --out runs/rank_allocation        # a 2-layer 32-wide GPT-2: a CPU check
    python scripts/rank_allocation.py --out runs/rank_allocation                # the embedded default run
    python scripts/rank_allocation.py --config configs/smollm2_qa.yaml --out runs/rank_allocation_smollm2

Seven methods, each the run config with a few keys changed (`jlora.research.allocation`): uniform r
(r = 8, alpha = 16, the source's) and uniform with rsLoRA, trained together as one population; EVA;
AdaLoRA from 1.5x the rank budget down to it; LoRA-GA; PiSSA; and jlora's own allocation ("energy":
a short probe at 4x the rank, each module's rank from the energy of its dW per parameter, at the
uniform run's parameter count). Every method trains with `jlora train`'s loop and is evaluated merged
into its base by one compiled forward pass.

Reported per method (summary.json, and a line each): validation loss on answer tokens, exact match
(greedy, the first ``exact_match`` validation rows), wall time (training, compilation included, and the
method's own probe, PCA or gradient pass), each module's rank and the LoRA parameter count. The plot is
a heat map per method: layers down, modules across, the rank each module got.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from jlora.cli import exit_status
from jlora.core.lora.config import path_order
from jlora.research import allocation as al
from jlora.research import experiments as ex
from jlora.research import plots

# --quick: the research scripts' tiny model, two layers (so layers can differ), a short run
QUICK = ["model.random={n_layer: 2, n_embd: 32, n_head: 2, n_positions: 64}", "steps=16", "exact_match=16"]
QUICK += ["lora.eva.batches=8", "lora.lora_ga.batches=2", "checkpoint.every=1000", "log_every=1000"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ex.add_run_arguments(parser)
    parser.add_argument("--methods", help=f"comma-separated subset of {','.join(al.METHODS)} (default: all)")
    parser.add_argument("--probe-steps", type=int, help="the energy probe's steps (default: a fifth of the run's)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    if args.quick:
        args.set = [*QUICK, *args.set]
    cfg = ex.script_config(args)
    methods = al.METHODS if not args.methods else tuple(m for m in al.METHODS if m in args.methods.split(","))
    out = Path(args.out)
    task = ex.load_task(cfg)
    print(f"{cfg.model.name} | {task.train.summary()} | {cfg.steps} steps, lr {cfg.optim.lr:g} | r = {cfg.lora.r}")

    trained = {}
    bar = tqdm(total=len(methods), desc="methods", unit="method", disable=args.quick)
    if any(m in al.POPULATION for m in methods):
        bar.set_postfix_str("uniform + rslora (one population)")
        trained.update({m: t for m, t in al.train_population(cfg, out).items() if m in methods})
        bar.update(sum(m in al.POPULATION for m in methods))
    for name in methods:
        if name in al.POPULATION:
            continue
        bar.set_postfix_str(name)
        if name == "energy":
            probe_steps = args.probe_steps or max(cfg.steps // 5, 1)
            trained[name] = al.train_energy(cfg, out, task.run.params, probe_steps=probe_steps)
        else:
            trained[name] = al.train_single(name, cfg, out)
        bar.update(1)
    bar.close()

    results = {name: al.evaluate(task, trained[name], exact=cfg.exact_match) for name in methods}
    every = sorted({p for row in results.values() for p in row["ranks"]}, key=path_order)
    for name, row in results.items():
        row["ranks"] = {p: row["ranks"].get(p, 0) for p in every}  # 0: the method left the module without an adapter
        print(
            f"{name:>8}: val loss {row['val_loss']:.4f}  exact match {row['exact_match']:.3f}  "
            f"{row['seconds']:.1f} s  LoRA params {row['lora_params']:,}  ranks {sorted(set(row['ranks'].values()))}"
        )
    summary = {
        "model": cfg.model.name,
        "targets": list(cfg.lora.target_modules),
        "steps": cfg.steps,
        "lr": cfg.optim.lr,
        "r": cfg.lora.r,
        "budget_params": results["uniform"]["lora_params"] if "uniform" in results else None,
        "methods": results,
        "seconds": time.perf_counter() - start,
    }
    ex.save_summary(out, summary)
    plot(out, summary)
    return summary


def plot(out: Path, summary: dict) -> None:
    grids, columns = {}, None
    for name, row in summary["methods"].items():
        grid, columns = al.rank_grid(row["ranks"])
        grids[f"{name} (val {row['val_loss']:.3f})"] = grid
    top = max(float(np.max(g)) for g in grids.values())
    plots.heatmaps(
        out / "rank_allocation.png",
        grids,
        xlabel="module",
        ylabel="layer",
        vmax=max(top, 1.0),
        label="rank",
        column_labels=columns,
        row_labels=[str(i) for i in range(len(next(iter(grids.values()))))],
        title=f"ranks per module at one budget ({summary['steps']} steps, r = {summary['r']})",
    )


if __name__ == "__main__":
    sys.exit(exit_status("rank_allocation.py", main))
