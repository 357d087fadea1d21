"""Rank against the amount of data: LoRA at every rank on training sets of several sizes, the same budget for each.

    python scripts/data_size_sweep.py --quick --out runs/data_size                 # seconds on a CPU
    python scripts/data_size_sweep.py --out runs/data_size                         # the bundled QA set, 125-1000 rows
    python scripts/data_size_sweep.py --planted 16 --sizes 1000,10000,100000 --out runs/data_size_planted
    python scripts/data_size_sweep.py --config gpt2_qa --out runs/data_size_gpt2  # GPT-2 small, on a GPU

For each size N, the run config's adapters at each rank of --ranks, once with alpha = 2r and
once with alpha fixed (--fixed-alpha, default the config's), train together as one population
(`jlora.research.experiments.fit_population`) for the config's steps on N training rows, so a
small set is seen for many epochs and a large one for few. The sets are nested: each is drawn
from the next larger (`jlora.research.experiments.take_rows`). The data:

    default       the config's training set (the bundled QA set holds 1,000 rows), its validation set
    --planted K   a teacher is the base plus a rank-K update (spectrum --spectrum, default harmonic:
                  s_i = s_1 / i) on --targets; a row is random tokens with, at every position, a target
                  drawn from the teacher's next-token distribution (`jlora.research.planted.teacher_rows`),
                  as many as wanted; --val-rows fresh rows validate, and the KL to the teacher is exact.
                  Base and teacher have ln_f's scale times --sharpen (default 10), so their
                  distributions are as peaked as a trained model's and a single sampled target says
                  something about the planted update

Reported per size and run: validation loss, training loss on the N rows, their gap (overfitting),
(planted) the KL to the teacher on fresh random tokens, and the best r of each series: by
validation loss, or with --planted by that KL (sampled targets make the loss noisy; the KL is
what it estimates, without the noise). The source's claim under test:
r should grow with the data, r = 8 at about 1K examples, 16 at 10K, 32 at 100K (a VC argument).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax

from jlora.cli import exit_status
from jlora.core.lora.config import LoraConfig
from jlora.errors import UsageError
from jlora.research import experiments as ex
from jlora.research import plots
from jlora.research.planted import SPECTRA, distill_gap, plant_low_rank, sharpen, teacher_rows

SOURCE = {1_000: 8, 10_000: 16, 100_000: 32}  # the source's table: rows -> r


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ex.add_run_arguments(parser)
    parser.add_argument("--sizes", help="training set sizes (default 125,250,500,1000; --planted 1000,10000,100000)")
    parser.add_argument("--ranks", help="comma-separated (default 1,2,4,8,16,32,64; --quick 1,8)")
    parser.add_argument("--fixed-alpha", type=float, help="alpha of the fixed series (default: the config's)")
    planted = parser.add_argument_group("a planted teacher's data (--planted)")
    planted.add_argument("--planted", type=int, metavar="K", help="rank of the planted update")
    planted.add_argument("--spectrum", default="harmonic", choices=sorted(SPECTRA), help="planted singular values")
    planted.add_argument("--scale", type=float, default=8.0, help="planted top singular value / W's (default 8)")
    planted.add_argument("--targets", default="c_attn", help="weights to plant in, comma-separated (default c_attn)")
    planted.add_argument("--sharpen", type=float, default=10.0, help="ln_f's scale times this (default 10)")
    planted.add_argument("--val-rows", type=int, default=2048, help="validation rows (default 2048)")
    planted.add_argument("--seq-len", type=int, default=32, help="tokens a row (default 32)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    ex.check_arguments(
        args, fixed_alpha="> 0", planted=">= 1", scale="> 0", sharpen="> 0", val_rows=">= 1", seq_len=">= 2"
    )
    default_sizes = "1000,10000,100000" if args.planted else "125,250,500,1000"
    sizes = sorted(ex.numbers(args.sizes or ("64,512" if args.quick else default_sizes), "--sizes"))
    ranks = ex.numbers(args.ranks or ("1,8" if args.quick else "1,2,4,8,16,32,64"), "--ranks")
    cfg = ex.script_config(args)
    fixed = cfg.lora.alpha if args.fixed_alpha is None else args.fixed_alpha
    task = ex.load_task(cfg)
    task, teacher = planted_task(args, task, max(sizes)) if args.planted else (task, None)
    if max(sizes) > len(task.train):
        raise UsageError(f"--sizes: {max(sizes)} rows asked for, the training set holds {len(task.train)}")
    params = task.run.params
    base_val = ex.val_loss(task, {"params": params})
    floor = None if teacher is None else ex.val_loss(task, {"params": teacher})
    print(
        f"{cfg.model.name} | {'planted rank ' + str(args.planted) if teacher else 'the config data'} | "
        f"sizes {sizes} | {cfg.steps} steps of {cfg.batch_size} rows | base val loss {base_val:.4f}"
        + ("" if floor is None else f", the teacher's {floor:.4f}")
    )

    settings = list(dict.fromkeys((r, alpha) for r in ranks for alpha in (2.0 * r, fixed)))
    members = [ex.member(cfg, r=r, alpha=alpha) for r, alpha in settings]
    names = {"alpha = 2r": lambda r: 2.0 * r, f"alpha = {fixed:g}": lambda r: fixed}
    by_size = []
    for n in sizes:
        train = ex.take_rows(task.train, n, cfg.seed)
        task_n = dataclasses.replace(task, train=train)
        fits = ex.fit_population(task_n, members, progress=not args.quick, desc=f"{len(members)} adapters, {n} rows")
        runs = {}
        for (r, alpha), fit in zip(settings, fits, strict=True):
            row = {
                "r": r,
                "alpha": alpha,
                "trainable_params": fit.n_trainable,
                "val_loss": ex.val_loss(task, fit.variables),
                "train_loss": ex.val_loss(task, fit.variables, data=train),
            }
            row["gap"] = row["val_loss"] - row["train_loss"]
            if teacher is not None:
                merged = ex.merged_params(fit.variables)
                row["kl"] = distill_gap(task.base_model, teacher, merged, jax.random.key(cfg.seed + 1))
            runs[r, alpha] = row
        series = {name: [runs[r, alpha(r)] for r in ranks] for name, alpha in names.items()}
        measure = "val_loss" if teacher is None else "kl"  # sampled targets make the loss noisy; the KL is exact
        best = {name: min(rows, key=lambda row: row[measure])["r"] for name, rows in series.items()}
        by_size.append({"rows": n, "epochs": cfg.steps * cfg.batch_size / n, "series": series, "best_r": best})
        print(
            f"{n:>7} rows ({by_size[-1]['epochs']:.1f} epochs): best r "
            + ", ".join(f"{name}: {r}" for name, r in best.items())
            + f" | {measure} by r (alpha = 2r): "
            + " ".join(f"{row['r']}:{row[measure]:.4f}" for row in series["alpha = 2r"])
        )
    summary = {
        "model": cfg.model.name,
        "data": "planted" if teacher is not None else "config",
        "planted": None
        if teacher is None
        else {k: getattr(args, k) for k in ("planted", "spectrum", "scale", "targets", "sharpen", "val_rows")},
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "lr": cfg.optim.lr,
        "sizes": sizes,
        "ranks": ranks,
        "fixed_alpha": fixed,
        "base_val_loss": base_val,
        "teacher_val_loss": floor,
        "best_by": "val_loss" if teacher is None else "kl",
        "base_kl": None
        if teacher is None
        else distill_gap(task.base_model, teacher, params, jax.random.key(cfg.seed + 1)),
        "by_size": by_size,
        "source": {str(n): r for n, r in SOURCE.items()},
        "seconds": time.perf_counter() - start,
    }
    ex.save_summary(args.out, summary)
    plot(args.out, summary)
    return summary


def planted_task(args, task: ex.Task, n: int) -> tuple[ex.Task, dict]:
    """`task` with a sharpened base, `n` training rows and --val-rows validation rows sampled from a teacher."""
    cfg = task.cfg
    params = sharpen(task.run.params, args.sharpen)
    planted_cfg = LoraConfig(r=args.planted, alpha=float(args.planted), target_modules=tuple(args.targets.split(",")))
    key = jax.random.key(cfg.seed)
    teacher, _ = plant_low_rank(jax.random.fold_in(key, 0), params, planted_cfg, args.scale, spectrum=args.spectrum)
    seq_len = min(args.seq_len, task.base_model.config.n_positions)
    rows = lambda i, m: teacher_rows(jax.random.fold_in(key, i), task.base_model, teacher, m, seq_len)  # noqa: E731
    run = dataclasses.replace(task.run, params=params)
    return dataclasses.replace(task, run=run, train=rows(1, n), val=rows(2, args.val_rows)), teacher


def plot(out, summary: dict) -> None:
    sizes, ranks = summary["sizes"], summary["ranks"]
    names = list(summary["by_size"][0]["series"])

    def per_size(name, field):
        return {f"{s['rows']:,} rows": (ranks, [row[field] for row in s["series"][name]]) for s in summary["by_size"]}

    source = {int(n): r for n, r in summary["source"].items()}
    best = {f"best r, {name}": (sizes, [s["best_r"][name] for s in summary["by_size"]]) for name in names}
    best["the source's table"] = (list(source), list(source.values()))
    measure = summary["best_by"]
    base = summary["base_val_loss"] if measure == "val_loss" else summary["base_kl"]
    label = "validation loss" if measure == "val_loss" else "KL(teacher || model), held out"
    plots.panels(
        f"{out}/data_size_sweep.png",
        [
            *(
                dict(
                    series=per_size(name, measure),
                    xlabel="rank r",
                    ylabel=label,
                    title=f"{name} (the base model: {base:.3g})",
                    logx=True,
                    logy=measure == "kl",
                )
                for name in names
            ),
            dict(
                series=best,
                xlabel="training rows",
                ylabel=f"r with the lowest {label.split(',')[0]}",
                title="best r against data",
                logx=True,
                xticks=sorted({*sizes, *source}),
            ),
            dict(
                series=per_size(names[0], "gap"),
                xlabel="rank r",
                ylabel="validation - training loss",
                title=f"overfitting ({names[0]})",
                logx=True,
            ),
        ],
        title=f"rank against data ({summary['steps']} steps of {summary['batch_size']} rows, lr {summary['lr']:g})",
    )


if __name__ == "__main__":
    sys.exit(exit_status("data_size_sweep.py", main))
