"""Does lr * alpha / r decide training? Runs with equal and unequal products, compared curve to curve.

    python scripts/alpha_sweep.py --quick --out runs/alpha_sweep        # a 1-layer 32-wide GPT-2: seconds on a CPU
    python scripts/alpha_sweep.py --out runs/alpha_sweep                # the default run (4 layers, 128 wide)
    python scripts/alpha_sweep.py --config configs/gpt2_qa.yaml --out runs/alpha_sweep_gpt2   # GPT-2 small, on a GPU

The source document defines the effective learning rate as lr * alpha / r and says it is what
matters. With r fixed at the config's, the runs are:

    equal products     alpha in --alphas, lr = lr0 * alpha0 / alpha   (lr * alpha / r = lr0 * alpha0 / r for all)
    unequal products   alpha = alpha0, lr = lr0 * m for m in --lr-multipliers

(lr0, alpha0: the config's.) The runs train together as one population (one compiled step whose
members have their own alpha and learning rate). Every pair of runs is compared by the mean absolute difference of
their training-loss curves (a running mean over 20 steps first) and of their final validation
losses; pairs whose products are equal are then set against pairs whose products differ. With
plain SGD, scaling alpha by c and lr by 1/c is the same update to B A to first order; Adam
normalises each gradient, so the script measures how far that carries over rather than assuming it.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time

import numpy as np

from jlora.cli import exit_status
from jlora.core.lora.config import effective_lr
from jlora.research import experiments as ex
from jlora.research import plots

WINDOW = 20


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ex.add_run_arguments(parser)
    parser.add_argument("--alphas", help="equal-product series, comma-separated (default 4,8,16,32,64; --quick 8,16)")
    parser.add_argument(
        "--lr-multipliers", help="unequal series at the config's alpha (default 0.25,0.5,2,4; --quick 2)"
    )
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    ex.check_arguments(args)
    alphas = ex.numbers(args.alphas or ("8,16" if args.quick else "4,8,16,32,64"), "--alphas", float)
    multipliers = ex.numbers(args.lr_multipliers or ("2" if args.quick else "0.25,0.5,2,4"), "--lr-multipliers", float)
    cfg = ex.script_config(args)
    r, alpha0, lr0 = cfg.lora.r, cfg.lora.alpha, cfg.optim.lr
    settings = [(alpha, lr0 * alpha0 / alpha) for alpha in alphas]
    settings += [(alpha0, lr0 * m) for m in multipliers if (alpha0, lr0 * m) not in settings]

    task = ex.load_task(cfg)
    print(
        f"{cfg.model.name} | r={r} | {cfg.steps} steps | lr0 {lr0:g}, alpha0 {alpha0:g}: "
        f"lr*alpha/r = {lr0 * alpha0 / r:g}"
    )
    members = [ex.member(cfg, alpha=alpha, lr=lr) for alpha, lr in settings]
    fits = ex.fit_population(task, members, progress=not args.quick, desc=f"{len(members)} adapters")
    runs = []
    for (alpha, lr), m, fit in zip(settings, members, fits, strict=True):
        runs.append(
            {
                "alpha": alpha,
                "lr": lr,
                "effective_lr": effective_lr(lr, m.lora),
                "val_loss": ex.val_loss(task, fit.variables),
                "losses": fit.losses,
            }
        )
        print(
            f"alpha={alpha:>5g} lr={lr:.3g}: lr*alpha/r {runs[-1]['effective_lr']:.3g}  "
            f"val loss {runs[-1]['val_loss']:.4f}"
        )

    pairs = []
    for a, b in itertools.combinations(runs, 2):
        pairs.append(
            {
                "alphas": [a["alpha"], b["alpha"]],
                "lrs": [a["lr"], b["lr"]],
                "equal_product": math.isclose(a["effective_lr"], b["effective_lr"], rel_tol=1e-9),
                "curve_distance": ex.curve_distance(a["losses"], b["losses"], window=WINDOW),
                "val_loss_distance": abs(a["val_loss"] - b["val_loss"]),
            }
        )
    verdict = {}
    for name, equal in (("equal_product", True), ("unequal_product", False)):
        chosen = [p for p in pairs if p["equal_product"] == equal]
        verdict[name] = {
            "pairs": len(chosen),
            "mean_curve_distance": float(np.mean([p["curve_distance"] for p in chosen])) if chosen else None,
            "max_curve_distance": max((p["curve_distance"] for p in chosen), default=None),
            "min_curve_distance": min((p["curve_distance"] for p in chosen), default=None),
            "mean_val_loss_distance": float(np.mean([p["val_loss_distance"] for p in chosen])) if chosen else None,
        }
    eq, ne = verdict["equal_product"]["mean_curve_distance"], verdict["unequal_product"]["mean_curve_distance"]
    ratio = ne / eq if eq and ne is not None else None
    print(f"mean curve distance: equal products {eq}, unequal products {ne} (ratio {ratio})")

    summary = {
        "model": cfg.model.name,
        "r": r,
        "steps": cfg.steps,
        "window": WINDOW,
        "runs": runs,  # each with its training loss at every step
        "pairs": pairs,
        "summary": verdict,
        "unequal_over_equal": ratio,
        "seconds": time.perf_counter() - start,
    }
    ex.save_summary(args.out, summary)
    plot(args.out, runs, r)
    return summary


def plot(out, runs: list[dict], r: int) -> None:
    products = sorted({round(run["effective_lr"], 12) for run in runs})
    curves, styles = {}, {}
    for i, run in enumerate(runs):
        label = f"alpha={run['alpha']:g}, lr={run['lr']:.2g}  (lr*alpha/r={run['effective_lr']:.2g})"
        curves[label] = run["losses"]
        colour = f"C{products.index(round(run['effective_lr'], 12))}"  # one colour per product
        styles[label] = {"color": colour, "linestyle": ("-", "--", ":", "-.")[i % 4]}
    plots.curves(
        f"{out}/alpha_sweep.png",
        curves,
        styles=styles,
        window=WINDOW,
        title=f"r={r}: one colour per lr * alpha / r (running mean over {WINDOW} steps)",
    )


if __name__ == "__main__":
    sys.exit(exit_status("alpha_sweep.py", main))
