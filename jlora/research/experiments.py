"""The scripts' shared pieces: a task held in memory, fitting to it, and a dense update seen through LoRA.

The research scripts train many small models in one process, so these pieces leave out what
`jlora.training.loop.train` adds for one long run (checkpoints, logs, exact-match decoding) and keep
what the comparisons need, built from the same library functions::

    task = load_task(cfg)                          # tokenizer, base model + params, data: as `train` builds them
    variables = lora_variables(task, lora_cfg)     # {"params": base, "lora": fresh adapters}
    fit = fit(task, variables, lora_mask(variables, cfg), cfg, lora_cfg=lora_cfg)   # losses (steps,), variables
    fits = fit_population(task, [member(cfg, r=4, alpha=8), member(cfg, r=8, lr=1e-3)])  # many at once
    val_loss(task, fit.variables)                  # adapters merged into the base; loss on answer tokens

A sweep trains its adapters as one population (`fit_population`: one compiled step vmapped over
the members, `jlora.core.update.population`); each member's fit is the one `fit` would give alone.
Every model is evaluated merged (``jlora.core.lora.merge``) by one compiled forward of the plain base
model, so a sweep compiles one train step and one evaluation in all. A full
fine-tune's update is read back through `kernel_deltas` (dW per weight) and `truncate_deltas`
(the model with each dW cut to rank r). The planted-rank experiment lives in `jlora.research.planted`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jlora.checks import check_number
from jlora.core.analysis.divergence import forgetting_sums
from jlora.core.lora.adapter import init_lora, output_columns, split_slice, unflatten_adapters
from jlora.core.lora.config import LoraConfig
from jlora.core.lora.merge import merge
from jlora.core.lora.svd import lora_from_delta
from jlora.core.update.mesh import mesh_placement
from jlora.core.update.optim import trainable_mask
from jlora.core.update.population import (
    Member,
    Population,
    member_variables,
    population,
    split_member,
)
from jlora.core.update.step import TrainState, TrainStep, compile_eval, make_eval_step
from jlora.errors import ConfigError, DataError, UsageError
from jlora.exchange.folders import check_out_dir
from jlora.training.data.rows import TokenizedData, batch_at
from jlora.training.run.build import Run, build_run, init_key, trainer_of
from jlora.training.run.config import DEFAULT_CONFIG, RunConfig, adapter_seed, load_run_config
from jlora.training.run.evaluate import mean_loss
from jlora.training.run.loop import Hook, run_hooks, train_steps
from jlora.training.run.population import population_trainer
from jlora.tree import get_path, replace_paths

PyTree = Any


# A script's --quick run: a 1-layer, 32-wide GPT-2 and short runs, seconds each on a CPU.
QUICK = (
    "model.random={n_layer: 1, n_embd: 32, n_head: 2, n_positions: 64, embd_pdrop: 0.0, resid_pdrop: 0.0}",
    "seq_len=64",
    "data.buckets=64",  # every batch one shape: compiling is much of a quick run
    "batch_size=16",
    "steps=300",
    "optim.lr=1e-2",
    "eval_batches=8",
)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every research script shares: --out, --quick, --config, --set."""
    parser.add_argument("--out", required=True, metavar="DIR", help="where summary.json and the plots go")
    parser.add_argument("--quick", action="store_true", help="a tiny model and short runs (a CPU check, seconds)")
    parser.add_argument("--config", help="YAML run config (default: the embedded default run, as `jlora train`)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, as `jlora train`")


def numbers(text: str, option: str, kind: type = int) -> list:
    """A comma-separated command-line list of positive, finite numbers, e.g. ``--dims 16,64``; UsageError (one
    line) for anything else.

    >>> numbers("16,64", "--dims"), numbers("0.5,2", "--lr", float)
    ([16, 64], [0.5, 2.0])
    """
    try:
        values = [kind(x) for x in text.split(",")]
    except ValueError:
        values = None
    if not values or not all(v > 0 and math.isfinite(v) for v in values):
        finite = ", finite" if kind is float else ""
        raise UsageError(f"{option}: {text!r} is not a comma-separated list of positive{finite} {kind.__name__}s")
    return values


def check_arguments(args: argparse.Namespace, **bounds: str) -> None:
    """A script's arguments, before any work: --out a folder that can be written (`check_out_dir`), and each
    numeric option named in `bounds` (its argparse name: its range, as `jlora.checks.within` reads it), when
    given, a finite number (an integer where argparse gives one) in that range; UsageError (one line) if not.

    >>> check_arguments(argparse.Namespace(out="out", scale=float("inf")), scale="> 0")
    Traceback (most recent call last):
    jlora.errors.UsageError: --scale must be a finite number > 0, got inf
    """
    check_out_dir(args.out)
    for name, within in bounds.items():
        value = getattr(args, name)
        if value is not None:
            check_number("--" + name.replace("_", "-"), value, within, integer=isinstance(value, int), error=UsageError)


def script_config(args: argparse.Namespace) -> RunConfig:
    """The run config a script's arguments describe: --config, then QUICK if --quick, then --set."""
    return load_run_config(args.config or DEFAULT_CONFIG, [*(QUICK if args.quick else ()), *args.set])


def save_summary(out: str | Path, summary: Mapping) -> Path:
    """Write ``OUT/summary.json`` (numpy and JAX numbers as plain JSON numbers)."""

    def plain(x):
        if isinstance(x, Mapping):
            return {str(k): plain(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [plain(v) for v in x]
        if isinstance(x, np.ndarray | jax.Array):
            return plain(np.asarray(x).tolist())
        if isinstance(x, np.generic):
            return x.item()
        return x

    path = Path(out) / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plain(summary), indent=2) + "\n")
    return path


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """A run's base model and data, built once and shared by every configuration of a sweep.

    `base_model` is `run.model` without a LoRA config: it evaluates merged weights, so one
    compiled evaluation serves every adapter (`eval_step`; `forget_step` on the held-out text,
    `jlora.research.forgetting`).
    """

    cfg: RunConfig
    run: Run
    train: TokenizedData
    val: TokenizedData
    base_model: Any  # the base family's module (GPT2, Llama)
    eval_step: Callable
    forget_step: Callable


def load_task(cfg: RunConfig) -> Task:
    """The tokenizer, base model, base params and tokenized data of `cfg`, as `jlora.training.run.loop` builds them."""
    if not cfg.data.validation:
        raise ConfigError("the research scripts compare validation losses: set data.validation")
    run = build_run(cfg)
    base_model = run.model.clone(lora=None)
    forget = lambda inputs, batch: forgetting_sums(base_model, inputs["adapted"], inputs["base"], batch)  # noqa: E731
    eval_step = make_eval_step(base_model, n_devices=1)
    return Task(cfg, run, run.train, run.val, base_model, eval_step, compile_eval(forget, eval_step.placement))


def lora_variables(task: Task, lora_cfg: LoraConfig, *, seed: int | None = None) -> dict:
    """``{"params": base, "lora": fresh adapters}``, initialised as `jlora train` does with adapter seed
    `seed` (default the task config's)."""
    key = init_key(adapter_seed(task.cfg) if seed is None else seed)
    return {"params": task.run.params, "lora": init_lora(key, lora_cfg, task.run.params)}


def lora_mask(variables: Mapping, cfg: RunConfig) -> PyTree:
    """The trainable mask `jlora.training.run.loop` uses: every adapter leaf plus `cfg.trainable`'s base leaves."""
    return trainable_mask(variables, bias=cfg.trainable.bias, modules_to_save=cfg.trainable.modules_to_save)


@dataclasses.dataclass(frozen=True, eq=False)
class Fit:
    """A trained model: its variables, its training loss at each step (steps,), its trainable size."""

    variables: dict
    losses: np.ndarray
    n_trainable: int


class Runner(NamedTuple):
    """What a fit steps: its state at step 0, its compiled step and the step's dropout key(s)."""

    state: TrainState
    step: TrainStep
    rng: jax.Array


def solo_runner(task: Task, variables: dict, mask: PyTree, cfg: RunConfig, lora_cfg: LoraConfig | None) -> Runner:
    """One model's `Runner`, through the run layer's trainer (`jlora.training.run.build.trainer_of`): the leaves
    `mask` selects train with ``cfg.optim``; dropout from the adapter seed; one device."""
    run = dataclasses.replace(task.run, cfg=cfg, model=task.run.model.clone(lora=lora_cfg or cfg.lora))
    trainer = trainer_of(run, variables, mask)
    step = trainer.make_step(mesh_placement(1, devices=1))
    return Runner(step.place(trainer.state), step, trainer.rng)


def population_runner(task: Task, members: Sequence[Member], cfg: RunConfig) -> tuple[Runner, Population]:
    """The `Runner` of `members` trained together, each initialised and seeded as `fit_member` would: the run
    layer's population trainer (`jlora.training.run.population.population_trainer`), on one device."""
    run = dataclasses.replace(task.run, cfg=cfg, model=task.run.model.clone(lora=members[0].lora))
    trainer = population_trainer(run, members=members)
    step = trainer.make_step(mesh_placement(len(members), devices=1))
    return Runner(step.place(trainer.state), step, trainer.rng), population(members, task.run.params)


def run_steps(task: Task, runner: Runner, cfg: RunConfig, *, progress: bool, desc: str | None):
    """(final state, training losses (steps,) or (steps, K)): ``cfg.steps`` updates on the task's batches,
    through the run layer's loop (`jlora.training.run.loop.train_steps`) with a hook keeping each loss."""
    from tqdm.auto import tqdm

    losses = []
    steps = train_steps(
        runner.step, runner.state, lambda i: batch_at(task.train, i, cfg.batch_size, cfg.seed), runner.rng,
        start=0, stop=cfg.steps,
    )  # fmt: skip
    with tqdm(total=cfg.steps, disable=not progress, desc=desc, leave=False, dynamic_ncols=True) as bar:
        hooks = [Hook(lambda info: losses.append(info.metrics["loss"])), Hook(lambda info: bar.update(1))]
        last = run_hooks(steps, hooks)
    return last.state, np.asarray(jax.device_get(losses), np.float64)


def fit(
    task: Task,
    variables: dict,
    mask: PyTree,
    cfg: RunConfig | None = None,
    *,
    lora_cfg: LoraConfig | None = None,
    progress: bool = False,
    desc: str | None = None,
) -> Fit:
    """Train the leaves `mask` selects for ``cfg.steps`` AdamW updates on `task`'s training batches.

    The batches, optimizer and dropout keys are those of `jlora train` with the same config
    (``batch_at(data, step, batch_size, seed)``, ``cfg.optim``), without its checkpoints and
    logs. `cfg` defaults to the task's; `lora_cfg` gives the adapters' dropout (default ``cfg.lora``; the
    scales are the adapters' own). A tqdm bar shows progress when `progress` is set.
    """
    cfg = cfg or task.cfg
    state, losses = run_steps(
        task, solo_runner(task, variables, mask, cfg, lora_cfg), cfg, progress=progress, desc=desc
    )
    return Fit(state.variables, losses, sum(x.size for x in jax.tree.leaves(state.trainable)))


def member(
    cfg: RunConfig, name: str | None = None, *, lr: float | None = None, seed: int | None = None, **lora
) -> Member:
    """A population member: the run's adapters with the LoRA settings in `lora` (r, alpha, rslora)
    replaced, at learning rate `lr` (default the run's) and adapter seed `seed` (default the run's)."""
    optim = cfg.optim
    lora_cfg = cfg.lora.replace(**lora)
    name = name or ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in lora.items())
    seed = adapter_seed(cfg) if seed is None else seed
    return Member(lora_cfg, optim.lr if lr is None else lr, optim.loraplus_ratio, seed, name)


def member_run(cfg: RunConfig, m: Member) -> RunConfig:
    """The solo run config of member `m`: its learning rate, LoRA+ ratio and adapter seed."""
    optim = dataclasses.replace(cfg.optim, lr=m.lr, loraplus_ratio=m.loraplus_ratio)
    return dataclasses.replace(cfg, lora=m.lora, optim=optim, adapter_seed=m.seed)


def fit_member(task: Task, m: Member, cfg: RunConfig | None = None, **options) -> Fit:
    """`fit` of member `m` alone: what `fit_population` trains as one of many."""
    run_cfg = member_run(cfg or task.cfg, m)
    variables = lora_variables(task, m.lora, seed=m.seed)
    return fit(task, variables, lora_mask(variables, run_cfg), run_cfg, lora_cfg=m.lora, **options)


def fit_population(
    task: Task,
    members: Sequence[Member],
    cfg: RunConfig | None = None,
    *,
    progress: bool = False,
    desc: str | None = None,
) -> list[Fit]:
    """Train `members` together on `task` as `fit` trains one: one compiled step for all of them.

    Each member starts as `lora_variables` would start it (A from its adapter seed, B = 0), trains
    the adapters and ``cfg.trainable``'s base leaves with its own learning rate, and gets its own
    dropout keys; member k's `Fit` is `fit_member`'s, to float rounding.
    """
    cfg = cfg or task.cfg
    runner, pop = population_runner(task, members, cfg)
    state, losses = run_steps(task, runner, cfg, progress=progress, desc=desc)  # losses (steps, K)
    fits = []
    for k in range(pop.size):
        trained = split_member(state.trainable, k, pop)
        n_trainable = sum(x.size for x in jax.tree.leaves({"params": trained["params"], "lora": trained["lora"]}))
        fits.append(Fit(member_variables(state, k, pop), losses[:, k], n_trainable))
    return fits


def merged_params(variables: Mapping) -> dict:
    """The base params with the adapters (if any, each with its scale) folded in: what the plain base
    model evaluates."""
    lora = variables.get("lora")
    return merge(variables["params"], lora) if lora else variables["params"]


def val_loss(task: Task, variables: Mapping, *, data: TokenizedData | None = None):
    """Mean validation loss over answer tokens (the first ``cfg.eval_batches`` batches), adapters merged first.

    `data` scores other rows instead of the validation set (e.g. the training rows, for the train-validation gap).
    """
    params = {"params": merged_params(variables)}
    rows = task.val if data is None else data
    return mean_loss(task.eval_step, params, rows, task.cfg.batch_size, max_batches=task.cfg.eval_batches)


def take_rows(data: TokenizedData, n: int, seed: int) -> TokenizedData:
    """`n` rows of `data` drawn without replacement, in their order; with one seed, a smaller set lies inside
    every larger one.

    Raises DataError when `n` is not between 1 and the number of rows.
    """
    if not 1 <= n <= len(data):
        raise DataError(f"cannot take {n} rows of a set of {len(data)}; valid: 1 .. {len(data)}")
    index = np.sort(np.random.default_rng(seed).permutation(len(data))[:n])
    return dataclasses.replace(data, **data.rows(index), example_index=data.example_index[index])


def curve_distance(a: Sequence[float], b: Sequence[float], *, window: int = 10) -> float:
    """Mean absolute difference of two loss curves after a running mean over `window` steps.

    The running mean removes the batch-to-batch noise both curves share, so what remains is
    how differently the two runs learn.

    >>> round(curve_distance([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 5.0], window=2), 4)  # |3.5 - 4.0| / 3
    0.1667
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"curves must be 1-D and of one length, got {a.shape} and {b.shape}")
    window = max(1, min(window, a.size))
    kernel = np.ones(window) / window
    smooth = lambda c: np.convolve(c, kernel, mode="valid")  # noqa: E731
    return float(np.mean(np.abs(smooth(a) - smooth(b))))


def kernel_deltas(before: Mapping, after: Mapping, paths: Sequence[str]) -> dict[str, jax.Array]:
    """{path: dW (d_out, d_in)} = trained minus original weight of each module path (maths layout)."""
    out = {}
    for path in paths:
        module = split_slice(path)[0]
        w0, w1 = get_path(before, module)["kernel"], get_path(after, module)["kernel"]
        cols = output_columns(path, w0.shape[1])
        out[path] = (w1[:, cols].astype(jnp.float32) - w0[:, cols].astype(jnp.float32)).T
    return out


def truncate_deltas(before: Mapping, after: Mapping, paths: Sequence[str], ranks: Sequence[int]) -> dict[int, dict]:
    """For each r: `after` with every path's update dW cut to its best rank-r approximation.

    Each dW is factored once, at full rank, by `lora_from_delta`; its factors are
    ``sqrt(s_i) u_i`` and ``sqrt(s_i) v_i`` by descending s_i, so their first r columns / rows
    are the rank-r truncation (Eckart-Young) for every r. The truncations go in as a LoRA tree
    merged onto the original kernels; every other leaf of `after` (biases and LayerNorms a full
    fine-tune also trained) is kept.

    Returns:
      {r: params}.
    """
    factors = {}
    for path, dw in kernel_deltas(before, after, paths).items():
        factors[path], _ = lora_from_delta(dw, min(dw.shape))
    originals = {f"{split_slice(p)[0]}.kernel" for p in paths}
    base = replace_paths(after, {path: get_path(before, path) for path in originals})
    out = {}
    for r in ranks:
        flat = {}
        for path, f in factors.items():
            n = min(r, f["A"].shape[0])
            flat[path] = {"A": f["A"][:n], "B": f["B"][:, :n], "scaling": 1.0}
        out[r] = merge(base, unflatten_adapters(flat))
    return out
