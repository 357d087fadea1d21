"""Fully fine-tune the weights LoRA would adapt, and ask how low-rank the full update is.

    python scripts/full_vs_lora.py --quick --out runs/full_vs_lora      # a 1-layer 32-wide GPT-2: seconds on a CPU
    python scripts/full_vs_lora.py --out runs/full_vs_lora              # the default run (4 layers, 128 wide)
    python scripts/full_vs_lora.py --config configs/gpt2_qa.yaml --full-lr 2e-5 --out runs/full_vs_lora_gpt2  # GPU

Two runs on the config's task, the same data order and steps:

    full   every weight the config's LoRA targets trains in full (kernel and bias, PEFT's
           ``modules_to_save``), with the config's other trainable leaves (e.g. ln_f); lr --full-lr
    LoRA   the config's run as it is (rank r adapters on those weights)

For each adapted weight, dW = W_full - W. Reported: the share of ||dW||_F^2 in its top r
singular values for r in --ranks (the source says 90 %+ at small r), and the validation loss
of the model whose every dW is cut to its best rank-r approximation (Eckart-Young, through
`jlora.core.svd.lora_from_delta`, all other trained leaves kept), beside the full and the LoRA runs'.
And each run's intruder dimensions per weight (`jlora.core.svd.module_intruders`: of the tuned
weight's top 10 singular vectors, those with |cos| < 0.5 against all of W's; Shuttleworth et al. 2024).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from jlora.core.svd import module_intruders, spectrum
from jlora.research import experiments as ex
from jlora.research import plots


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ex.add_run_arguments(parser)
    parser.add_argument("--ranks", default="1,2,4,8,16,32", help="truncation ranks (default 1,2,4,8,16,32)")
    parser.add_argument("--full-lr", type=float, help="learning rate of the full fine-tune (default: the config's)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    cfg = ex.script_config(args)
    ranks = [int(r) for r in args.ranks.split(",")]
    task = ex.load_task(cfg)
    params = task.run.params
    paths = cfg.lora.module_paths(len(params["h"]))
    base_val = ex.val_loss(task, {"params": params})

    full_lr = args.full_lr or cfg.optim.lr
    modules = tuple(dict.fromkeys(p.split(".")[-1] for p in paths))  # c_attn, c_proj, ...: every block's
    full_cfg = dataclasses.replace(
        cfg,
        optim=dataclasses.replace(cfg.optim, lr=full_lr),
        trainable=dataclasses.replace(cfg.trainable, modules_to_save=(*cfg.trainable.modules_to_save, *modules)),
    )
    variables = {"params": params}
    full = ex.fit(task, variables, ex.lora_mask(variables, full_cfg), full_cfg, progress=not args.quick, desc="full")
    full_val = ex.val_loss(task, full.variables)
    variables = ex.lora_variables(task, cfg.lora)
    lora = ex.fit(task, variables, ex.lora_mask(variables, cfg), progress=not args.quick, desc="LoRA")
    lora_val = ex.val_loss(task, lora.variables, cfg.lora)
    print(
        f"base val loss {base_val:.4f} | "
        f"full fine-tune (lr {full_lr:g}, {full.n_trainable:,} trained) {full_val:.4f} | "
        f"LoRA r={cfg.lora.r} ({lora.n_trainable:,} trained) {lora_val:.4f}"
    )

    intruders = {  # {run: {path: count}}
        name: {p: fig["intruders"] for p, fig in module_intruders(params, tuned, paths).items()}
        for name, tuned in (("full", full.variables["params"]), ("lora", ex.merged_params(lora.variables, cfg.lora)))
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
            "val_loss": lora_val,
            "trainable_params": lora.n_trainable,
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
        ],
    )


if __name__ == "__main__":
    main()
