"""Fully fine-tune the weights LoRA would adapt: how low-rank is the full update, and who forgets more?

    python scripts/full_vs_lora.py --quick --out runs/full_vs_lora      # a 1-layer 32-wide GPT-2: seconds on a CPU
    python scripts/full_vs_lora.py --out runs/full_vs_lora              # the default run (4 layers, 128 wide)
    python scripts/full_vs_lora.py --config configs/gpt2_qa.yaml --full-lr 2e-5 --out runs/full_vs_lora_gpt2  # GPU

Runs on the config's task, the same data order and steps:

    full   every weight the config's LoRA targets trains in full (kernel and bias, PEFT's
           ``modules_to_save``), with the config's other trainable leaves (e.g. ln_f); lr --full-lr
    LoRA   the config's run at each rank of --lora-ranks (alpha scaled to keep the config's
           alpha / r), all ranks trained at once as one population

For each adapted weight, dW = W_full - W. Reported: the share of ||dW||_F^2 in its top r
singular values for r in --ranks (the source says 90 %+ at small r), and the validation loss
of the model whose every dW is cut to its best rank-r approximation (Eckart-Young, through
`jlora.core.lora.svd.lora_from_delta`, all other trained leaves kept), beside the full and the LoRA runs'.

Learning against forgetting (Biderman et al., 2024, "LoRA learns less and forgets less"): for the
full fine-tune and every LoRA rank, the validation loss on the task (learning) and, on held-out
text from outside it (--forgetting, default the config's ``eval.forgetting`` or jlora's bundled
generic sentences), the loss increase over the base and the mean per-token KL(base || model)
(forgetting; `jlora.research.forgetting`). A random base knows no text to forget: --pretrain N
first trains it in full for N steps on the held-out text.

And each run's intruder dimensions per weight (`jlora.core.lora.svd.module_intruders`: of the tuned
weight's top 10 singular vectors, those with |cos| < 0.5 against all of W's; Shuttleworth et al. 2024).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np

from jlora.cli import exit_status
from jlora.core.lora.config import alpha_for_rank
from jlora.core.lora.svd import module_intruders, spectrum
from jlora.research import experiments as ex
from jlora.research import plots
from jlora.research.forgetting import forgetting, pretrain


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ex.add_run_arguments(parser)
    parser.add_argument("--ranks", default="1,2,4,8,16,32", help="truncation ranks (default 1,2,4,8,16,32)")
    parser.add_argument("--full-lr", type=float, help="learning rate of the full fine-tune (default: the config's)")
    parser.add_argument("--lora-ranks", help="LoRA ranks, one population (default 1,2,4,8,16,32; --quick 1,8)")
    parser.add_argument("--forgetting", help="held-out text, JSONL (default: the config's eval.forgetting, or bundled)")
    parser.add_argument("--pretrain", type=int, default=0, metavar="N", help="first train the base N steps on it")
    parser.add_argument("--pretrain-lr", type=float, help="learning rate of --pretrain (default: the config's)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    ex.check_arguments(args, full_lr="> 0", pretrain=">= 0", pretrain_lr="> 0")
    ranks = ex.numbers(args.ranks, "--ranks")
    lora_ranks = ex.numbers(args.lora_ranks or ("1,8" if args.quick else "1,2,4,8,16,32"), "--lora-ranks")
    cfg = ex.script_config(args)
    forgetting_text = args.forgetting or cfg.eval.forgetting or "bundled"
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, forgetting=forgetting_text))
    lora_ranks = sorted({*lora_ranks, cfg.lora.r})
    task = ex.load_task(cfg)
    if args.pretrain:
        task = pretrain(task, args.pretrain, args.pretrain_lr, progress=not args.quick)
    params = task.run.params
    paths = cfg.lora.module_paths(params)
    base_val = ex.val_loss(task, {"params": params})

    full_lr = cfg.optim.lr if args.full_lr is None else args.full_lr
    modules = tuple(dict.fromkeys(p.split(".")[-1] for p in paths))  # c_attn, c_proj, ...: every block's
    full_cfg = dataclasses.replace(
        cfg,
        optim=dataclasses.replace(cfg.optim, lr=full_lr),
        trainable=dataclasses.replace(cfg.trainable, modules_to_save=(*cfg.trainable.modules_to_save, *modules)),
    )
    variables = {"params": params}
    full = ex.fit(task, variables, ex.lora_mask(variables, full_cfg), full_cfg, progress=not args.quick, desc="full")
    full_val = ex.val_loss(task, full.variables)
    members = [ex.member(cfg, r=r, alpha=alpha_for_rank(cfg.lora, r)) for r in lora_ranks]
    fits = ex.fit_population(task, members, progress=not args.quick, desc=f"LoRA at {len(members)} ranks")
    lora_runs = []
    for m, fit in zip(members, fits, strict=True):
        lora_runs.append(
            {
                "r": m.lora.r,
                "alpha": m.lora.alpha,
                "val_loss": ex.val_loss(task, fit.variables),
                "trainable_params": fit.n_trainable,
                **forgetting(task, fit.variables),
            }
        )
    at_r = lora_ranks.index(cfg.lora.r)  # the config's own rank: its run is "the LoRA run" below
    lora, lora_fit = lora_runs[at_r], fits[at_r]
    full_row = {"val_loss": full_val, "trainable_params": full.n_trainable, **forgetting(task, full.variables)}
    print(
        f"base val loss {base_val:.4f} | "
        f"full fine-tune (lr {full_lr:g}, {full.n_trainable:,} trained) {full_val:.4f} | "
        f"LoRA r={cfg.lora.r} ({lora['trainable_params']:,} trained) {lora['val_loss']:.4f}"
    )
    for name, row in [("full", full_row), *((f"LoRA r={run['r']}", run) for run in lora_runs)]:
        print(
            f"{name:>10}: learned (val loss) {row['val_loss']:.4f}  forgot (held-out loss {row['forget_loss']:.4f} "
            f"vs base {row['forget_base_loss']:.4f}: {row['forgetting']:+.4f}, KL {row['forget_kl']:.4f})"
        )

    intruders = {  # {run: {path: count}}
        name: {p: fig["intruders"] for p, fig in module_intruders(params, tuned, paths).items()}
        for name, tuned in (
            ("full", full.variables["params"]),
            ("lora", ex.merged_params(lora_fit.variables)),
        )
    }
    print(
        "intruder dimensions (top 10, |cos| < 0.5), summed over weights: "
        + ", ".join(f"{name} {sum(counts.values())}" for name, counts in intruders.items())
    )

    deltas = ex.kernel_deltas(params, full.variables["params"], paths)
    energy = {}
    for path, dw in deltas.items():
        curve = np.asarray(spectrum(np.linalg.svd(np.asarray(dw), compute_uv=False))["energy"])
        energy[path] = {str(r): float(curve[min(r, curve.size) - 1]) for r in ranks}
    truncated = []
    for r, params_r in ex.truncate_deltas(params, full.variables["params"], paths, ranks).items():
        row = {"r": r, "val_loss": ex.val_loss(task, {"params": params_r})}
        row["mean_energy"] = float(np.mean([energy[p][str(r)] for p in paths]))
        row["min_energy"] = float(np.min([energy[p][str(r)] for p in paths]))
        truncated.append(row)
        print(
            f"rank {r:>3}: energy kept {row['mean_energy']:.3f} (min {row['min_energy']:.3f})  "
            f"val loss {row['val_loss']:.4f}"
        )

    summary = {
        "model": cfg.model.name,
        "steps": cfg.steps,
        "ranks": ranks,
        "base_val_loss": base_val,
        "full": {"lr": full_lr, "val_loss": full_val, "trainable_params": full.n_trainable},
        "lora": {
            "r": cfg.lora.r,
            "alpha": cfg.lora.alpha,
            "lr": cfg.optim.lr,
            "val_loss": lora["val_loss"],
            "trainable_params": lora["trainable_params"],
        },
        "learn_forget": {
            "text": forgetting_text,
            "pretrain_steps": args.pretrain,
            "base_forget_loss": full_row["forget_base_loss"],
            "full": full_row,
            "lora": lora_runs,
        },
        "truncated": truncated,
        "intruders": intruders,
        "energy": energy,
        "shapes": {p: list(dw.shape) for p, dw in deltas.items()},
        "seconds": time.perf_counter() - start,
    }
    ex.save_summary(args.out, summary)
    plot(args.out, summary)
    return summary


def plot(out, summary: dict) -> None:
    ranks = summary["ranks"]
    rows = summary["truncated"]
    per_kind: dict[str, list] = {}
    for path, curve in summary["energy"].items():
        per_kind.setdefault(".".join(path.split(".")[2:]), []).append([curve[str(r)] for r in ranks])
    energy = {kind: (ranks, np.mean(curves, axis=0).tolist()) for kind, curves in per_kind.items()}
    plots.panels(
        f"{out}/full_vs_lora.png",
        [
            dict(
                series=energy,
                hlines={"90 %": 0.9},
                xlabel="r",
                ylabel="share of ||dW||_F^2 in the top r",
                title="full fine-tune's dW: energy in its top r (mean over layers)",
                logx=True,
            ),
            dict(
                series={"full dW cut to rank r": (ranks, [row["val_loss"] for row in rows])},
                hlines={
                    "full fine-tune": summary["full"]["val_loss"],
                    f"LoRA r={summary['lora']['r']}": summary["lora"]["val_loss"],
                    "base model": summary["base_val_loss"],
                },
                xlabel="r",
                ylabel="validation loss",
                title="best rank-r truncation against LoRA",
                logx=True,
            ),
            *(learn_forget_panel(summary, measure, label) for measure, label in FORGETTING),
        ],
        max_cols=2,
    )


FORGETTING = (
    ("forgetting", "forgetting: held-out loss - base's"),
    ("forget_kl", "forgetting: KL(base || model) on held-out text"),
)


def learn_forget_panel(summary: dict, measure: str, label: str) -> dict:
    """Learning (task validation loss, lower is more) against forgetting, LoRA by rank and the full fine-tune.

    The base model's task loss goes in the axis label, not as a line: it would squeeze the points together."""
    lf = summary["learn_forget"]
    lora = lf["lora"]
    where = f" (the base trained {lf['pretrain_steps']} steps on it)" if lf["pretrain_steps"] else ""
    text = "jlora's generic text" if lf["text"] == "bundled" else lf["text"]
    return dict(
        series={
            "LoRA": ([run[measure] for run in lora], [run["val_loss"] for run in lora]),
            "full fine-tune": ([lf["full"][measure]], [lf["full"]["val_loss"]]),
        },
        point_labels={"LoRA": [f"r={run['r']}" for run in lora]},
        xlabel=f"{label}\non {text}{where}",
        ylabel=f"task validation loss (base model: {summary['base_val_loss']:.2f})",
        title="learning against forgetting",
    )


if __name__ == "__main__":
    sys.exit(exit_status("full_vs_lora.py", main))
