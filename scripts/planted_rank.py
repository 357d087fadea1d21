"""Plant a known rank-k update in a model, and see which LoRA ranks recover it.

    python scripts/planted_rank.py --quick --out runs/planted          # a 1-layer 32-wide GPT-2: seconds on a CPU
    python scripts/planted_rank.py --out runs/planted                  # the default run's 4-layer model, longer
    python scripts/planted_rank.py --config configs/gpt2_qa.yaml --k 8 --ranks 2,4,8,16,32 --out runs/planted_gpt2

The teacher is the base model with ``dW* = U diag(s) V^T`` (rank k, random orthonormal U, V,
s from `scale` times W's top singular value down to half that) added to every targeted weight
(`jlora.research.planted.plant_low_rank`). Each student is the base model with fresh LoRA adapters
of rank r on the same weights, trained to match the teacher's next-token distributions
(KL(teacher || student)) on random token sequences; the students of every rank train at once, as
one population (`jlora.research.planted.distill_students`). Reported for each r:

    gap            KL(teacher || student) on held-out random tokens; "base_gap" is the untrained base's
    phi_row        phi(k, min(k, r)) between the input (row) spaces of dW* and the student's dW
    phi_column     the same for the output (column) spaces
    phi_A          the LoRA paper's eq. 4 on the two A matrices (their right singular vectors)
    energy_top_k   share of the student's dW energy in its top k singular values

The claim under test: the gap closes for r >= k and not for r < k, and the rank-k student's
update spans the planted one.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax

from jlora.cli import exit_status
from jlora.core.lora.config import LoraConfig
from jlora.core.lora.merge import merge
from jlora.core.update.optim import OptimConfig
from jlora.research import experiments as ex
from jlora.research import plots
from jlora.research.planted import compare_to_planted, distill_gap, distill_students, plant_low_rank
from jlora.training.run.build import build_run


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ex.add_run_arguments(parser)
    parser.add_argument("--k", type=int, default=4, help="rank of the planted update")
    parser.add_argument("--ranks", help="student ranks, comma-separated (default 1,2,4,8,16; --quick 2,4,8)")
    parser.add_argument("--scale", type=float, default=2.0, help="planted top singular value / W's (default 2)")
    parser.add_argument("--targets", default="c_attn", help="weights to plant in, comma-separated (default c_attn)")
    parser.add_argument("--steps", type=int, help="distillation steps per student (default 2000; --quick 500)")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    ex.check_arguments(args, k=">= 1", scale="> 0", steps=">= 1", lr="> 0", batch_size=">= 1", seq_len=">= 2")
    ranks = ex.numbers(args.ranks or ("2,4,8" if args.quick else "1,2,4,8,16"), "--ranks")
    steps = (500 if args.quick else 2000) if args.steps is None else args.steps
    targets = tuple(args.targets.split(","))
    run = build_run(ex.script_config(args))
    base, params = run.model.clone(lora=None), run.params
    seq_len = min(args.seq_len, base.config.n_positions)

    key = jax.random.key(args.seed)
    planted_cfg = LoraConfig(r=args.k, alpha=float(args.k), target_modules=targets)
    teacher, planted = plant_low_rank(jax.random.fold_in(key, 0), params, planted_cfg, args.scale)
    held_out = jax.random.fold_in(key, 1)  # evaluation tokens; the students draw theirs from fold_in(key, 2)
    base_gap = distill_gap(base, teacher, params, held_out, seq_len=seq_len)
    print(f"planted rank {args.k} on {', '.join(targets)} (scale {args.scale}); base gap KL = {base_gap:.3e}")

    optim = OptimConfig(lr=args.lr, total_steps=steps, warmup_steps=min(20, steps // 10), schedule="constant")
    student_key = jax.random.fold_in(key, 2)  # the same initial A and the same tokens at every rank
    cfgs = [LoraConfig(r=r, alpha=2.0 * r, target_modules=targets) for r in ranks]
    loras, losses = distill_students(
        base,
        params,
        teacher,
        cfgs,
        student_key,
        optim,
        batch_size=args.batch_size,
        seq_len=seq_len,
        progress=not args.quick,
    )
    students = []
    for cfg, lora, curve in zip(cfgs, loras, losses, strict=True):
        gap = distill_gap(base, teacher, merge(params, lora), held_out, seq_len=seq_len)
        s = {
            "r": cfg.r,
            "alpha": cfg.alpha,
            "gap": gap,
            "relative_gap": gap / base_gap,
            "final_loss": curve[-10:].mean(),
        }
        s |= compare_to_planted(lora, planted)
        students.append(s)
        print(
            f"r={cfg.r:>3}: gap {s['gap']:.3e} ({s['relative_gap']:.2%} of the base's)  "
            f"phi_row {s['phi_row']:.3f}  phi_column {s['phi_column']:.3f}  phi_A {s['phi_A']:.3f}  "
            f"energy top-{args.k} {s['energy_top_k']:.3f}"
        )

    at_k = next((s for s in students if s["r"] == args.k), None)
    summary = {
        "k": args.k,
        "scale": args.scale,
        "targets": list(targets),
        "ranks": ranks,
        "steps": steps,
        "base_gap": base_gap,
        "students": students,
        "rank_k": None if at_k is None else {name: at_k[name] for name in ("phi_row", "phi_column", "phi_A", "gap")},
        "seconds": time.perf_counter() - start,
    }
    ex.save_summary(args.out, summary)
    plot(args.out, summary)
    return summary


def plot(out, summary: dict) -> None:
    students, k = summary["students"], summary["k"]
    ranks = [s["r"] for s in students]
    series = lambda *names: {n: (ranks, [s[n] for s in students]) for n in names}  # noqa: E731
    plots.panels(
        f"{out}/planted_rank.png",
        [
            dict(
                series=series("relative_gap"),
                xlabel="student rank r",
                ylabel="KL gap / base model's",
                title=f"loss gap to the teacher (planted rank k={k})",
                logx=True,
                logy=True,
                vline=k,
            ),
            dict(
                series=series("phi_row", "phi_column", "energy_top_k"),
                xlabel="student rank r",
                ylabel="phi(k, min(k, r))  /  energy",
                title="student's dW against the planted dW*",
                logx=True,
                vline=k,
            ),
        ],
    )


if __name__ == "__main__":
    sys.exit(exit_status("planted_rank.py", main))
