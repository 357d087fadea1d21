"""Sweep the LoRA rank on one task, once with alpha = 2r and once with alpha fixed.

    python scripts/rank_sweep.py --quick --out runs/rank_sweep          # a 1-layer 32-wide GPT-2: seconds on a CPU
    python scripts/rank_sweep.py --out runs/rank_sweep                  # the default run (4 layers, 128 wide)
    python scripts/rank_sweep.py --config configs/gpt2_qa.yaml --out runs/rank_sweep_gpt2   # GPT-2 small, on a GPU

Every run is the run config's (``--config``/``--set``, as `jlora train`) with only the rank and
alpha changed: the same data order, initialisation seed, optimizer and steps. All of them train
together as one population (one compiled step, `jlora.research.experiments.fit_population`). Two series:

    alpha = 2r     scaling alpha / r = 2 at every rank (the source's "standard" preset)
    alpha fixed    (--fixed-alpha, default the config's alpha): scaling shrinks as 1 / r

For each run: final validation loss on answer tokens, training loss (last 10 steps), LoRA and
all trainable parameters, effective learning rate lr * alpha / r, and how concentrated the
update is: the share of dW's energy in its top 1, 2, 4, 8 singular values and its effective
rank (means over the adapted modules). The claims under test: alpha = 2r keeps training
comparable across r, and a simple task needs only a small r.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from jlora.cli import exit_status
from jlora.core.lora.config import effective_lr, scaling
from jlora.core.lora.counting import lora_param_count
from jlora.core.lora.svd import delta_svd
from jlora.research import experiments as ex
from jlora.research import plots

TOP = (1, 2, 4, 8)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ex.add_run_arguments(parser)
    parser.add_argument("--ranks", help="comma-separated (default 1,2,4,8,16,32,64; --quick 1,8,32)")
    parser.add_argument("--fixed-alpha", type=float, help="alpha of the fixed series (default: the config's)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    ex.check_arguments(args, fixed_alpha="> 0")
    ranks = ex.numbers(args.ranks or ("1,8,32" if args.quick else "1,2,4,8,16,32,64"), "--ranks")
    cfg = ex.script_config(args)
    fixed = cfg.lora.alpha if args.fixed_alpha is None else args.fixed_alpha
    task = ex.load_task(cfg)
    base_val = ex.val_loss(task, {"params": task.run.params})
    print(
        f"{cfg.model.name} | {task.train.summary()} | {cfg.steps} steps, lr {cfg.optim.lr:g} | "
        f"base val loss {base_val:.4f}"
    )

    series = {"alpha = 2r": [], f"alpha = {fixed:g}": []}
    settings = list(dict.fromkeys((r, alpha) for r in ranks for alpha in (2.0 * r, fixed)))  # r = fixed / 2: once
    members = [ex.member(cfg, r=r, alpha=alpha) for r, alpha in settings]
    fits = ex.fit_population(task, members, progress=not args.quick, desc=f"{len(members)} adapters")
    results = {setting: one_run(task, m.lora, fit) for setting, m, fit in zip(settings, members, fits, strict=True)}
    for (r, alpha), row in results.items():
        print(
            f"r={r:>3} alpha={alpha:>5g}: val loss {row['val_loss']:.4f}  effective lr {row['effective_lr']:.2e}  "
            f"top-1 energy {row['energy_top']['1']:.3f}  LoRA params {row['lora_params']:,}"
        )
    for r in ranks:
        for name, alpha in zip(series, (2.0 * r, fixed)):
            series[name].append(results[r, alpha])

    summary = {
        "model": cfg.model.name,
        "targets": list(cfg.lora.target_modules),
        "steps": cfg.steps,
        "lr": cfg.optim.lr,
        "ranks": ranks,
        "fixed_alpha": fixed,
        "base_val_loss": base_val,
        "series": series,
        "val_loss_spread": {name: float(np.ptp([row["val_loss"] for row in rows])) for name, rows in series.items()},
        "seconds": time.perf_counter() - start,
    }
    ex.save_summary(args.out, summary)
    plot(args.out, summary)
    return summary


def one_run(task: ex.Task, lora_cfg, fit: ex.Fit) -> dict:
    """The figures of one trained member (rank lora_cfg.r, alpha lora_cfg.alpha)."""
    cfg, r, alpha = task.cfg, lora_cfg.r, lora_cfg.alpha
    lora = fit.variables["lora"]
    report = delta_svd(lora).values()
    energy = {str(k): float(np.mean([fig["energy"][min(k, r) - 1] for fig in report])) for k in TOP if k <= r}
    return {
        "r": r,
        "alpha": alpha,
        "scaling": scaling(lora_cfg),
        "lr": cfg.optim.lr,
        "effective_lr": effective_lr(cfg.optim.lr, lora_cfg),
        "val_loss": ex.val_loss(task, fit.variables),
        "train_loss": float(np.mean(fit.losses[-10:])),
        "lora_params": lora_param_count(lora),
        "trainable_params": fit.n_trainable,
        "energy_top": energy,
        "effective_rank": float(np.mean([fig["effective_rank"] for fig in report])),
    }


def plot(out, summary: dict) -> None:
    def by_rank(field):
        return {
            name: ([row["r"] for row in rows], [field(row) for row in rows]) for name, rows in summary["series"].items()
        }

    plots.panels(
        f"{out}/rank_sweep.png",
        [
            dict(
                series=by_rank(lambda row: row["val_loss"]),
                xlabel="rank r",
                ylabel="validation loss",
                title=f"final validation loss (base model: {summary['base_val_loss']:.2f})",
                logx=True,
            ),
            dict(
                series=by_rank(lambda row: row["energy_top"]["1"]),
                xlabel="rank r",
                ylabel="share of ||dW||_F^2 in the top singular value",
                title="how concentrated the update is",
                logx=True,
            ),
        ],
        title=f"rank sweep ({summary['steps']} steps, lr {summary['lr']:g})",
    )


if __name__ == "__main__":
    sys.exit(exit_status("rank_sweep.py", main))
