"""A task's intrinsic dimension (Li et al. 2018): training in random d-dimensional subspaces, beside LoRA and in full.

    python scripts/intrinsic_dimension.py --quick --out runs/intrinsic                   # seconds on a CPU
    python scripts/intrinsic_dimension.py --out runs/intrinsic                           # the default run
    python scripts/intrinsic_dimension.py --quick --planted 1,4 --out runs/intrinsic_planted
    python scripts/intrinsic_dimension.py --planted 1,2,4,8,16 --out runs/intrinsic_planted   # rank against d90
    python scripts/intrinsic_dimension.py --config gpt2_qa --dims 16,64,256,1024,4096,16384 --out runs/id_gpt2  # GPU

Every model starts from the config's base, theta_0. Trained on the config's task (its batches,
steps, schedule and dropout; `jlora.research.intrinsic.fit_subspace`):

    subspace   theta = theta_0 + P z, only z (d,) trained, P a D x d Fastfood projection of unit
               columns over the weights LoRA adapts (each target module's kernel, with the config's
               other trainable leaves, e.g. ln_f); --whole-model: every weight. One population over
               --dims, z padded to the largest; --said: one learned scale per weight (counted in d).
               Each d trains at each --lr, z's learning rate being lr sqrt(D / d) so that theta moves
               as far a step as full training's at lr; the best is kept
    full       the same D weights trained directly (P = I), at each --full-lr, the best kept
    LoRA       the config's adapters at each rank of --lora-ranks (alpha keeping the config's alpha / r)

Reported: each run's validation loss, its share of full training's gain over the base,
d90 (the smallest d with 90 % of it) and each LoRA rank's parameter count beside it.

--planted K,... asks the same of planted tasks whose complexity is known: for each k, a teacher
is the base plus a rank-k update on every --targets weight (`jlora.research.planted`), and the
subspace members, a full distillation of those weights and LoRA students of each rank learn it
from the teacher's next-token distributions on random tokens. Reported per k: d90 (the teacher is
reachable, so d90 here is the smallest d whose KL gap to the teacher is at most 10 % of the base's;
Li et al.'s definition, 90 % of the full distillation's gain, is d90_vs_full), r90 (the smallest
LoRA rank whose gap is at most 10 % of the base's), and the dimension of the rank-k matrices the
teacher's update lies among, k (d_in + d_out - k) per weight.
The source's claim under test: the rank a task needs follows its intrinsic dimension.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax

from jlora.cli import exit_status
from jlora.core.lora.adapter import adapted_shape
from jlora.core.lora.config import LoraConfig, alpha_for_rank
from jlora.core.lora.counting import adapter_param_count
from jlora.core.lora.merge import merge
from jlora.core.update.optim import OptimConfig
from jlora.research import experiments as ex
from jlora.research import intrinsic as it
from jlora.research import plots
from jlora.research.fastfood import fastfood
from jlora.research.planted import distill_gap, distill_students, plant_low_rank
from jlora.training.run.build import build_run

DIMS = "16,64,256,1024,4096,16384"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ex.add_run_arguments(parser)
    parser.add_argument("--dims", help=f"subspace dimensions d (default {DIMS}, those <= D; --quick 8,64,512)")
    parser.add_argument(
        "--lr",
        help="learning rates, each d trained at each (z's lr: this times sqrt(D / d)), the best kept "
        "(default: the config's lr / 3, lr, 3 lr; --planted 0.001,0.003; --quick: the config's, 0.01)",
    )
    parser.add_argument(
        "--full-lr",
        help="learning rates of the full training, the best kept (default: the config's; --planted 0.001,0.003)",
    )
    parser.add_argument("--lora-ranks", help="LoRA ranks (default 1,2,4,8,16,32; --quick 1,8, with --planted 1,4)")
    parser.add_argument("--said", action="store_true", help="SAID: one learned scale per weight, counted in d")
    parser.add_argument("--whole-model", action="store_true", help="the subspace spans every weight of the model")
    parser.add_argument("--projection-seed", type=int, default=0, help="seed of P (default 0)")
    planted = parser.add_argument_group("planted tasks (--planted)")
    planted.add_argument("--planted", metavar="K,...", help="planted ranks k: measure d90 and r90 per k")
    planted.add_argument("--scale", type=float, default=2.0, help="planted top singular value / W's (default 2)")
    planted.add_argument("--targets", default="c_attn", help="weights to plant in and train, comma-separated")
    planted.add_argument("--steps", type=int, help="distillation steps (default 2000; --quick 300)")
    planted.add_argument("--lora-lr", type=float, default=1e-2, help="the LoRA students' learning rate (1e-2)")
    planted.add_argument("--batch-size", type=int, default=16)
    planted.add_argument("--seq-len", type=int, default=32)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    ex.check_arguments(args, scale="> 0", steps=">= 1", lora_lr="> 0", batch_size=">= 1", seq_len=">= 2")
    for option, kind in (("dims", int), ("lr", float), ("full_lr", float), ("lora_ranks", int), ("planted", int)):
        if getattr(args, option) is not None:  # a bad list fails here, before any work (one line, exit status 2)
            ex.numbers(getattr(args, option), "--" + option.replace("_", "-"), kind)
    cfg = ex.script_config(args)
    summary = measure_planted(args, cfg) if args.planted else measure_task(args, cfg)
    summary["seconds"] = time.perf_counter() - start
    ex.save_summary(args.out, summary)
    (plot_planted if args.planted else plot_task)(args.out, summary)
    return summary


def dims_for(args, space: it.Subspace, default: str) -> list[int]:
    """--dims as given (each must fit in D), or `default` cut at D."""
    if args.dims:
        return ex.numbers(args.dims, "--dims")
    return [d for d in ex.numbers(default, "--dims") if d <= space.size]


def grid(dims: list[int], lrs: list[float], space: it.Subspace, said: bool = False) -> tuple[it.Dims, list[float]]:
    """One population of every (d, lr): member i * len(lrs) + j trains d_i at lr_j * sqrt(D / d_i).

    Adam moves each of z's d entries by about its learning rate a step, and P's columns are unit
    vectors, so theta moves by about lr sqrt(d); the factor makes that lr sqrt(D), what full training
    at lr moves it by, whatever d is. Returns the population and each member's lr_j.
    """
    pairs = [(d, lr) for d in dims for lr in lrs]
    rates = [lr * (space.size / d) ** 0.5 for d, lr in pairs]
    return it.dims_population([d for d, _ in pairs], space, said=said, lr=rates), [lr for _, lr in pairs]


def scores(state, pop: it.Dims, space: it.Subspace, score) -> list[float]:
    """`score(params)` of every member's weights."""
    return [score(it.member_params(state, k, pop, space)) for k in range(pop.size)]


def best_by_d(pop: it.Dims, lrs: list[float], losses: list[float]) -> list[dict]:
    """For each d, its best learning rate's loss, and every learning rate's (`grid`'s lr_j)."""
    rows: dict[int, dict] = {}
    for d, lr, loss in zip(pop.dims, lrs, losses, strict=True):
        row = rows.setdefault(d, {"d": d, "by_lr": {}})
        row["by_lr"][f"{lr:g}"] = loss
        if "loss" not in row or loss < row["loss"]:
            row["loss"], row["lr"] = loss, lr
    return list(rows.values())


def measure_task(args, cfg) -> dict:
    task = ex.load_task(cfg)
    params = task.run.params
    trainable = cfg.trainable
    mask = it.space_mask(
        params, cfg.lora, bias=trainable.bias, modules_to_save=trainable.modules_to_save, whole=args.whole_model
    )
    space = it.subspace(params, mask)
    dims = dims_for(args, space, "8,64,512" if args.quick else DIMS)
    lr = cfg.optim.lr
    lrs = ex.numbers(args.lr or (f"{lr}" if args.quick else f"{lr / 3},{lr},{3 * lr}"), "--lr", float)
    full_lrs = ex.numbers(args.full_lr or f"{cfg.optim.lr}", "--full-lr", float)
    pop, pop_lrs = grid(dims, lrs, space, args.said)
    lora_ranks = ex.numbers(args.lora_ranks or ("1,8" if args.quick else "1,2,4,8,16,32"), "--lora-ranks")
    base_val = ex.val_loss(task, {"params": params})
    print(f"{cfg.model.name} | {task.train.summary()} | D = {space.size:,} weights in {len(space.paths)} leaves")

    progress = not args.quick
    full_pop, _ = grid([space.size], full_lrs, space)
    full_state, _ = it.fit_subspace(task, space, it.Identity(space.size), full_pop, progress=progress, desc="full")
    val = lambda p: ex.val_loss(task, {"params": p})  # noqa: E731
    full = best_by_d(full_pop, full_lrs, scores(full_state, full_pop, space, val))[0]

    proj = fastfood(jax.random.key(args.projection_seed), space.size, pop.width)
    state, _ = it.fit_subspace(task, space, proj, pop, progress=progress, desc=f"{pop.size} subspaces")
    subspaces = best_by_d(pop, pop_lrs, scores(state, pop, space, val))
    for row, share in zip(subspaces, it.recovered([r["loss"] for r in subspaces], base_val, full["loss"]), strict=True):
        row["val_loss"], row["recovered"] = row.pop("loss"), share

    members = [ex.member(cfg, r=r, alpha=alpha_for_rank(cfg.lora, r)) for r in lora_ranks]
    fits = ex.fit_population(task, members, progress=progress, desc=f"LoRA at {len(members)} ranks")
    lora_vals = [ex.val_loss(task, fit.variables) for m, fit in zip(members, fits, strict=True)]
    lora = [
        {"r": m.lora.r, "alpha": m.lora.alpha, "trainable_params": fit.n_trainable, "val_loss": v, "recovered": s}
        for m, fit, v, s in zip(members, fits, lora_vals, it.recovered(lora_vals, base_val, full["loss"]), strict=True)
    ]
    d90 = it.d90([r["d"] for r in subspaces], [r["val_loss"] for r in subspaces], base_val, full["loss"])
    best = min(lora, key=lambda row: row["val_loss"])
    r90 = next((row["r"] for row in lora if row["recovered"] >= 0.9), None)
    for row in subspaces:
        print(
            f"d={row['d']:>7}: val loss {row['val_loss']:.4f} at lr {row['lr']:g} "
            f"({row['recovered']:.1%} of full training's gain)"
        )
    for row in lora:
        print(
            f"LoRA r={row['r']:>3} ({row['trainable_params']:,} trained): val loss {row['val_loss']:.4f} "
            f"({row['recovered']:.1%})"
        )
    print(
        f"base {base_val:.4f} | full ({space.size:,} trained, lr {full['lr']:g}) {full['loss']:.4f} | "
        f"d90 {d90} | LoRA r90 {r90}"
    )
    return {
        "mode": "task",
        "model": cfg.model.name,
        "steps": cfg.steps,
        "lrs": lrs,
        "said": args.said,
        "whole_model": args.whole_model,
        "space": {"size": space.size, "leaves": list(space.paths)},
        "base_val_loss": base_val,
        "full": {"val_loss": full["loss"], "lr": full["lr"], "by_lr": full["by_lr"], "trainable_params": space.size},
        "subspaces": subspaces,
        "lora": lora,
        "lora_lr": cfg.optim.lr,
        "d90": d90,
        "lora_r90": r90,
        "best_lora": {"r": best["r"], "val_loss": best["val_loss"], "trainable_params": best["trainable_params"]},
    }


def rank_k_dimension(params, paths, k: int) -> int:
    """The dimension of the set of updates of rank <= k on `paths`: k (d_in + d_out - k) for each weight."""
    total = 0
    for path in paths:
        d_out, d_in = adapted_shape(params, path)
        total += k * (d_in + d_out - min(k, d_in, d_out))
    return total


def measure_planted(args, cfg) -> dict:
    ks = ex.numbers(args.planted, "--planted")
    steps = (300 if args.quick else 2000) if args.steps is None else args.steps
    ranks = ex.numbers(args.lora_ranks or ("1,4" if args.quick else "1,2,4,8,16,32"), "--lora-ranks")
    lrs = ex.numbers(args.lr or ("0.01" if args.quick else "0.001,0.003"), "--lr", float)
    full_lrs = ex.numbers(args.full_lr or ("0.01" if args.quick else "0.001,0.003"), "--full-lr", float)
    targets = tuple(args.targets.split(","))
    run = build_run(cfg)
    base, params = run.model.clone(lora=None), run.params
    seq_len = min(args.seq_len, base.config.n_positions)
    planted_on = LoraConfig(r=1, alpha=1.0, target_modules=targets)
    paths = planted_on.module_paths(params)
    space = it.subspace(params, it.space_mask(params, planted_on))
    dims = dims_for(args, space, "64,128,256" if args.quick else "128,256,512,768,1024,1536,2048,4096")
    pop, pop_lrs = grid(dims, lrs, space, args.said)
    full_pop, _ = grid([space.size], full_lrs, space)
    schedule = dict(total_steps=steps, warmup_steps=min(20, steps // 10), schedule="constant")
    optim, lora_optim = OptimConfig(lr=lrs[0], **schedule), OptimConfig(lr=args.lora_lr, **schedule)
    key = jax.random.key(cfg.seed)
    proj = fastfood(jax.random.key(args.projection_seed), space.size, pop.width)
    print(f"planted ranks {ks} on {', '.join(targets)} | D = {space.size:,} | d in {dims} at lr {lrs} | ranks {ranks}")
    lora_params = {r: sum(adapter_param_count(*adapted_shape(params, p)[::-1], r) for p in paths) for r in ranks}
    settings = dict(batch_size=args.batch_size, seq_len=seq_len, progress=not args.quick)
    full_step = it.make_subspace_step(it.distill_loss(base), space, optim, full_pop)  # compiled once for every k
    step = it.make_subspace_step(it.distill_loss(base), space, optim, pop)

    tasks = []
    for k in ks:
        planted_cfg = planted_on.replace(r=k, alpha=float(k))
        teacher, _ = plant_low_rank(jax.random.fold_in(key, k), params, planted_cfg, args.scale)
        held_out, students = jax.random.fold_in(key, 10_000 + k), jax.random.fold_in(key, 20_000 + k)
        gap = lambda p: distill_gap(base, teacher, p, held_out, seq_len=seq_len)  # noqa: E731, B023
        base_gap = gap(params)
        full_state, _ = it.distill_subspace(
            base, params, teacher, space, it.Identity(space.size), full_pop, students, optim, step=full_step, **settings
        )
        full = best_by_d(full_pop, full_lrs, scores(full_state, full_pop, space, gap))[0]
        state, _ = it.distill_subspace(base, params, teacher, space, proj, pop, students, optim, step=step, **settings)
        subspaces = best_by_d(pop, pop_lrs, scores(state, pop, space, gap))
        for row in subspaces:
            row["gap"] = row.pop("loss")
            row["relative_gap"] = row["gap"] / base_gap
            row["recovered"] = float(it.recovered([row["gap"]], base_gap, full["loss"])[0])
        cfgs = [LoraConfig(r=r, alpha=2.0 * r, target_modules=targets) for r in ranks]
        loras, _ = distill_students(base, params, teacher, cfgs, students, lora_optim, **settings)
        lora_gaps = [gap(merge(params, lora)) for lora in loras]
        r90 = next((r for r, g in zip(ranks, lora_gaps, strict=True) if g <= 0.1 * base_gap), None)
        measured, gaps = [r["d"] for r in subspaces], [r["gap"] for r in subspaces]
        d90 = it.d90(measured, gaps, base_gap, 0.0)  # 90 % of the gap to the teacher closed, as r90
        d90_vs_full = it.d90(measured, gaps, base_gap, full["loss"])  # Li et al.'s: 90 % of full training's gain
        row = {
            "k": k,
            "base_gap": base_gap,
            "full": {"gap": full["loss"], "relative_gap": full["loss"] / base_gap, "lr": full["lr"]},
            "subspaces": subspaces,
            "lora": [
                {"r": r, "params": lora_params[r], "gap": g, "relative_gap": g / base_gap}
                for r, g in zip(ranks, lora_gaps, strict=True)
            ],
            "d90": d90,
            "d90_vs_full": d90_vs_full,
            "r90": r90,
            "lora_params_at_r90": None if r90 is None else lora_params[r90],
            "rank_k_dimension": rank_k_dimension(params, paths, k),
        }
        tasks.append(row)
        print(
            f"k={k:>3}: base gap {base_gap:.3e}, full {row['full']['relative_gap']:.2%} of it | d90 {d90} "
            f"(against full: {d90_vs_full}) "
            f"(rank-k updates: {row['rank_k_dimension']:,} dims) | r90 {r90} ({row['lora_params_at_r90']} params) | "
            + " ".join(f"d={s['d']}:{s['relative_gap']:.2f}" for s in subspaces)
        )
    return {
        "mode": "planted",
        "model": cfg.model.name,
        "targets": list(targets),
        "scale": args.scale,
        "steps": steps,
        "lrs": lrs,
        "lora_lr": args.lora_lr,
        "said": args.said,
        "space": {"size": space.size, "leaves": list(space.paths)},
        "dims": dims,
        "ranks": ranks,
        "tasks": tasks,
    }


def plot_task(out, summary: dict) -> None:
    subspaces, lora = summary["subspaces"], summary["lora"]
    dims = [row["d"] for row in subspaces]
    lora_x = [row["trainable_params"] for row in lora]
    d90 = summary["d90"]
    lines = {"full training": summary["full"]["val_loss"], "base model": summary["base_val_loss"]}
    plots.panels(
        f"{out}/intrinsic_dimension.png",
        [
            dict(
                series={
                    "random subspace (x = d)": (dims, [row["val_loss"] for row in subspaces]),
                    "LoRA (x = its parameters)": (lora_x, [row["val_loss"] for row in lora]),
                },
                point_labels={"LoRA (x = its parameters)": [f"r={row['r']}" for row in lora]},
                hlines=lines,
                vline=d90,
                xlabel="trained numbers",
                ylabel="validation loss",
                title=f"d90 = {d90} (D = {summary['space']['size']:,})",
                logx=True,
                xticks=dims,
            ),
            dict(
                series={
                    "random subspace": (dims, [row["recovered"] for row in subspaces]),
                    "LoRA": (lora_x, [row["recovered"] for row in lora]),
                },
                point_labels={"LoRA": [f"r={row['r']}" for row in lora]},
                hlines={"90 %": 0.9},
                vline=d90,
                xlabel="trained numbers",
                ylabel="share of full training's gain",
                title="(base - loss) / (base - full)",
                logx=True,
                xticks=dims,
            ),
        ],
        title=f"intrinsic dimension ({summary['steps']} steps; lr the best of {summary['lrs']})",
    )


def plot_planted(out, summary: dict) -> None:
    tasks, dims, ranks = summary["tasks"], summary["dims"], summary["ranks"]
    with_d90 = [t for t in tasks if t["d90"] is not None]
    with_r90 = [t for t in tasks if t["r90"] is not None]
    ks = [t["k"] for t in tasks]
    plots.panels(
        f"{out}/intrinsic_dimension.png",
        [
            dict(
                series={f"k={t['k']}": (dims, [s["relative_gap"] for s in t["subspaces"]]) for t in tasks},
                hlines={"10 %": 0.1},
                xlabel="subspace dimension d",
                ylabel="KL gap / base model's",
                title="random subspaces",
                logx=True,
                logy=True,
            ),
            dict(
                series={f"k={t['k']}": (ranks, [s["relative_gap"] for s in t["lora"]]) for t in tasks},
                hlines={"10 %": 0.1},
                xlabel="LoRA rank r",
                ylabel="KL gap / base model's",
                title="LoRA students",
                logx=True,
                logy=True,
            ),
            dict(
                series={
                    "d90": ([t["k"] for t in with_d90], [t["d90"] for t in with_d90]),
                    "LoRA parameters at r90": ([t["k"] for t in with_r90], [t["lora_params_at_r90"] for t in with_r90]),
                    "dim of rank-k updates": (ks, [t["rank_k_dimension"] for t in tasks]),
                },
                xlabel="planted rank k",
                ylabel="dimensions",
                title="intrinsic dimension against k",
                logx=True,
                logy=True,
            ),
            dict(
                series={"r90": ([t["k"] for t in with_r90], [t["r90"] for t in with_r90]), "r = k": (ks, ks)},
                xlabel="planted rank k",
                ylabel="smallest LoRA rank closing 90 % of the gap",
                title="rank needed against k",
                logx=True,
                logy=True,
            ),
        ],
        title=f"planted rank-k teachers on {', '.join(summary['targets'])} ({summary['steps']} steps)",
    )


if __name__ == "__main__":
    sys.exit(exit_status("intrinsic_dimension.py", main))
