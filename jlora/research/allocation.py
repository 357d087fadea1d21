"""Every way of choosing r, side by side at one budget (`scripts/rank_allocation.py` composes these).

Each method is the run config with a few keys changed, trained by `jlora train`'s own loop, then read
back from its checkpoint and evaluated merged into the base by one compiled forward pass, so every
method is scored by the same program::

    uniform     r = 8, alpha = 16 (the source's), every target            )  one population: the two
    rslora      the same, scaled alpha / sqrt(r)                           )  members share one run
    eva         lora.init: eva: r = 8 per layer on average, redistributed by the inputs' explained variance
    adalora     init_r = 12 (1.5 x the budget) pruned to target_r = 8 while training
    lora_ga     lora.init: lora_ga, r = 8, on a residual base
    pissa       lora.init: pissa, r = 8, on a residual base
    energy      jlora's: a short probe at 4 x the rank, then each module's rank from its dW's energy

The budget is the uniform run's trainable LoRA parameters (r * (d_in + d_out) per module). EVA and
AdaLoRA budget ranks (sum of r), so their parameter counts move with which modules win; each method's
count is reported beside its figures.

*energy* (`energy_ranks`) reads the update a short high-rank probe learned: the rank-k truncation of a
module's dW keeps the sum of its k largest sigma_i^2 (Eckart-Young), and each rank costs d_in + d_out
parameters, so the budget goes to the singular values with the most energy per parameter, largest
first, until the uniform run's parameter count is spent. Unlike EVA (which looks at what enters a layer)
it looks at what the task asks of the layer; unlike AdaLoRA it decides once, before the real run.

>>> energy_ranks({"a": [3.0, 1.0], "b": [2.0, 0.5]}, {"a": 10, "b": 20}, budget=40)
{'a': 2, 'b': 1}
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jlora.core.lora import eva
from jlora.core.lora.adapter import adapted_shape, flatten_adapters
from jlora.core.lora.config import block_of, module_kind
from jlora.core.lora.counting import lora_param_count
from jlora.core.lora.merge import merge
from jlora.core.lora.svd import delta_svd
from jlora.research.experiments import Task, val_loss
from jlora.training.records.artifacts import load_run
from jlora.training.run.build import layout_of
from jlora.training.run.config import RunConfig, apply_overrides, from_dict
from jlora.training.run.evaluate import exact_match, greedy_predictor
from jlora.training.run.train import train

METHODS = ("uniform", "rslora", "eva", "adalora", "lora_ga", "pissa", "energy")
POPULATION = ("uniform", "rslora")  # the methods that differ only in what a population member may set
PROBE_FACTOR = 4  # the energy probe's rank, in multiples of r


def method_overrides(name: str, cfg: RunConfig) -> list[str]:
    """The ``--set`` overrides that turn the comparison's run config into method `name`'s (not the population's
    or the energy run's, which `train_population` and `train_energy` make)."""
    r, steps = cfg.lora.r, cfg.steps
    base = [f"lora.r={r}", f"lora.alpha={2 * r}"]
    if name == "eva":
        return [*base, "lora.init=eva"]
    if name == "adalora":
        init_r = (3 * r) // 2
        schedule = f"{{init_r: {init_r}, target_r: {r}, tinit: {steps // 10}, tfinal: {steps // 5}, deltaT: 1}}"
        return [f"lora.alpha={2 * init_r}", f"adalora={schedule}"]  # scaling 2 at the start, as the others
    if name in ("lora_ga", "pissa"):
        return [*base, f"lora.init={name}"]
    raise ValueError(f"no single-run overrides for {name!r}")


def with_overrides(cfg: RunConfig, overrides: Sequence[str]) -> RunConfig:
    """`cfg` with ``--set``-style overrides applied, checked as `jlora train` checks them."""
    return from_dict(apply_overrides(cfg.to_dict(), list(overrides)))


def training_config(cfg: RunConfig) -> RunConfig:
    """The runs train without evaluating (the comparison evaluates every method merged, once)."""
    return with_overrides(cfg, ["data.validation=null", "eval.forgetting=null", "exact_match=0"])


def timed_train(cfg: RunConfig, run_dir: Path, progress: bool) -> float:
    start = time.perf_counter()
    train(cfg, run_dir, progress=progress)
    return time.perf_counter() - start


def train_single(name: str, cfg: RunConfig, out: Path, *, progress: bool = False) -> dict:
    """Train method `name` alone in ``out/name``: {"run", "seconds"}."""
    run_cfg = training_config(with_overrides(cfg, method_overrides(name, cfg)))
    return {"run": out / name, "seconds": timed_train(run_cfg, out / name, progress)}


def train_population(cfg: RunConfig, out: Path, *, progress: bool = False) -> dict[str, dict]:
    """uniform and rslora as one population run in ``out/population``: {name: {"run", "member", "seconds"}} (the
    population's seconds, shared)."""
    r = cfg.lora.r
    members = f"{{members: [{{r: {r}, alpha: {2 * r}}}, {{r: {r}, alpha: {2 * r}, rslora: true}}]}}"
    run_cfg = training_config(with_overrides(cfg, [f"lora.r={r}", f"lora.alpha={2 * r}", f"population={members}"]))
    seconds = timed_train(run_cfg, out / "population", progress)
    return {name: {"run": out / "population", "member": k, "seconds": seconds} for k, name in enumerate(POPULATION)}


def energy_ranks(
    singular_values: Mapping[str, Sequence[float]], costs: Mapping[str, int], budget: int
) -> dict[str, int]:
    """{path: rank}: the singular values of the largest sigma^2 per parameter (``costs[path]`` = d_in + d_out),
    taken largest first while the parameter `budget` allows; 0 for a module that wins none."""
    candidates = sorted(
        ((float(s) ** 2 / costs[p], p) for p, values in singular_values.items() for s in values), reverse=True
    )
    ranks, spent = dict.fromkeys(singular_values, 0), 0
    for _, path in candidates:
        if spent + costs[path] <= budget:
            ranks[path] += 1
            spent += costs[path]
    return ranks


def train_energy(cfg: RunConfig, out: Path, params: Mapping, *, probe_steps: int, progress: bool = False) -> dict:
    """jlora's allocation: a probe at PROBE_FACTOR x r (at most a module's width) for `probe_steps` steps, its dW's
    spectra turned into a rank_pattern at the uniform run's parameter budget (`energy_ranks`), then the run:
    {"run", "seconds", "probe"}. `params`: the base's (their shapes)."""
    r = cfg.lora.r
    start = time.perf_counter()
    high = PROBE_FACTOR * r
    narrow = {p: min(adapted_shape(params, p)) for p in cfg.lora.module_paths(params)}
    pattern = {p: w for p, w in narrow.items() if w < high}
    alphas = {p: 2.0 * w for p, w in pattern.items()}
    probe_lora = cfg.lora.replace(r=high, alpha=2.0 * high, rank_pattern=pattern, alpha_pattern=alphas)
    probe_cfg = training_config(dataclasses.replace(cfg, steps=probe_steps, lora=probe_lora))
    train(probe_cfg, out / "energy_probe", progress=progress)
    _, params, lora, _, _ = load_run(out / "energy_probe")
    figures = delta_svd(lora)
    costs = {p: sum(adapted_shape(params, p)) for p in figures}
    budget = r * sum(costs.values())
    ranks = energy_ranks({p: np.asarray(f["singular_values"]) for p, f in figures.items()}, costs, budget)
    pattern_cfg = with_overrides(cfg, [f"lora.r={r}", f"lora.alpha={2 * r}"])
    resolved = eva.resolved(pattern_cfg.lora, ranks, params)  # the ranks as patterns, alpha = 2 r_l
    run_cfg = training_config(dataclasses.replace(pattern_cfg, lora=resolved))
    train(run_cfg, out / "energy", progress=progress)
    return {"run": out / "energy", "seconds": time.perf_counter() - start, "probe": ranks}


def evaluate(task: Task, trained: Mapping[str, Any], *, exact: int) -> dict:
    """The method's figures: validation loss and exact match of its adapter merged into its base (the residual
    of PiSSA and LoRA-GA), its ranks {module: r} and its parameters."""
    member = trained.get("member")
    _, params, lora, lora_cfg, _ = load_run(trained["run"], member=member)
    merged = {"params": merge(params, lora)}
    flat = flatten_adapters(lora)
    ranks = {p: int(a["A"].shape[0]) for p, a in flat.items()}
    kept = {p: int((np.asarray(a["E"]) != 0).sum()) for p, a in flat.items() if "E" in a}
    cfg = task.cfg
    predict = greedy_predictor(task.base_model)
    row = {
        "val_loss": float(val_loss(task, merged)),
        "exact_match": float(exact_match(predict, merged, task.val, exact, cfg.batch_size, layout=layout_of(cfg, 1))),
        "seconds": trained["seconds"],
        "ranks": kept or ranks,
        "lora_params": int(lora_param_count(lora)),
        "init": lora_cfg.init,
    }
    if kept:  # AdaLoRA: it trains init_r triplets and keeps the budget's
        row["trained_ranks"] = ranks
        widths = {p: a["A"].shape[1] + a["B"].shape[0] + 1 for p, a in flat.items()}  # A's row, B's column, E
        row["kept_params"] = sum(k * widths[p] for p, k in kept.items())
    if "probe" in trained:
        row["probe_ranks"] = trained["probe"]
    return row


def rank_grid(ranks: Mapping[str, int]) -> tuple[np.ndarray, list[str]]:
    """(layers x module kinds ranks, the kinds): the heat map of one method's allocation (0 where no adapter)."""
    kinds = list(dict.fromkeys(module_kind(p) for p in ranks))
    layers = sorted({block_of(p) for p in ranks})
    grid = np.zeros((len(layers), len(kinds)))
    for path, r in ranks.items():
        grid[layers.index(block_of(path)), kinds.index(module_kind(path))] = r
    return grid, kinds
