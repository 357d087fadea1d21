"""The scripts' shared pieces: a task held in memory, fitting to it, and a dense update seen through LoRA.

The research scripts train many small models in one process, so these pieces leave out what
`jlora.training.loop.train` adds for one long run (checkpoints, logs, exact-match decoding) and keep
what the comparisons need, built from the same library functions::

    task = load_task(cfg)                          # tokenizer, base model + params, data: as `train` builds them
    variables = lora_variables(task, lora_cfg)     # {"params": base, "lora": fresh adapters}
    fit = fit(task, variables, lora_mask(variables, cfg), cfg, lora_cfg=lora_cfg)   # losses (steps,), variables
    val_loss(task, fit.variables, lora_cfg)        # adapters merged into the base; loss on answer tokens

Every model is evaluated merged (``jlora.core.merge``) by one compiled forward of the plain base
model, so a sweep compiles one train step per configuration and one evaluation in all. A full
fine-tune's update is read back through `kernel_deltas` (dW per weight) and `truncate_deltas`
(the model with each dW cut to rank r). The planted-rank experiment lives in `jlora.research.planted`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core.gpt2 import GPT2
from jlora.core.lora import init_lora, output_columns, split_slice, unflatten_adapters
from jlora.core.lora_config import LoraConfig
from jlora.core.merge import merge
from jlora.core.optim import make_optimizer, partition, trainable_mask
from jlora.core.step import init_state, make_eval_step, make_train_step
from jlora.core.svd import lora_from_delta
from jlora.errors import ConfigError
from jlora.training.data import TokenizedData, batch_at
from jlora.training.evaluate import mean_loss
from jlora.training.run import Run, build_run
from jlora.training.run_config import DEFAULT_CONFIG, RunConfig, load_run_config
from jlora.tree import get_path, replace_paths

PyTree = Any


# A script's --quick run: a 1-layer, 32-wide GPT-2 and short runs, seconds each on a CPU.
QUICK = (
    "model.random={n_layer: 1, n_embd: 32, n_head: 2, n_positions: 64, embd_pdrop: 0.0, resid_pdrop: 0.0}",
    "seq_len=64",
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
    compiled evaluation serves every adapter (`eval_step`).
    """

    cfg: RunConfig
    run: Run
    train: TokenizedData
    val: TokenizedData
    base_model: GPT2
    eval_step: Callable


def load_task(cfg: RunConfig) -> Task:
    """The tokenizer, base model, base params and tokenized data of `cfg`, as `jlora.training.loop` builds them."""
    if not cfg.data.validation:
        raise ConfigError("the research scripts compare validation losses: set data.validation")
    run = build_run(cfg)
    base_model = run.model.clone(lora=None)
    return Task(cfg, run, run.train, run.val, base_model, make_eval_step(base_model, n_devices=1))


def lora_variables(task: Task, lora_cfg: LoraConfig) -> dict:
    """``{"params": base, "lora": fresh adapters}``, initialised with the key `jlora.training.loop` uses."""
    key = jax.random.fold_in(jax.random.key(task.cfg.seed), 1)
    return {"params": task.run.params, "lora": init_lora(key, lora_cfg, task.run.params)}


def lora_mask(variables: Mapping, cfg: RunConfig) -> PyTree:
    """The trainable mask `jlora.training.loop` uses: every adapter leaf plus `cfg.trainable`'s base leaves."""
    return trainable_mask(variables, bias=cfg.trainable.bias, modules_to_save=cfg.trainable.modules_to_save)


@dataclasses.dataclass(frozen=True, eq=False)
class Fit:
    """A trained model: its variables, its training loss at each step (steps,), its trainable size."""

    variables: dict
    losses: np.ndarray
    n_trainable: int


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

    The batches, optimizer and dropout keys are those of `jlora.training.loop.train` with the same
    config (``batch_at(data, step, batch_size, seed)``, ``cfg.optim``), without its checkpoints
    and logs. `cfg` defaults to the task's; `lora_cfg` gives the adapters' scaling (default
    ``cfg.lora``). A tqdm bar shows progress when `progress` is set.
    """
    from tqdm.auto import trange

    cfg = cfg or task.cfg
    model = task.run.model.clone(lora=lora_cfg or cfg.lora)
    ocfg = cfg.optim  # an OptimConfig whose total_steps is cfg.steps
    optimizer = make_optimizer(ocfg, partition(variables, mask)[0])
    state = init_state(variables, mask, optimizer)
    step = make_train_step(model, optimizer, ocfg, n_devices=1)
    key = jax.random.key(cfg.seed)
    losses = []
    for i in trange(cfg.steps, disable=not progress, desc=desc, leave=False, dynamic_ncols=True):
        state, metrics = step(state, batch_at(task.train, i, cfg.batch_size, cfg.seed), key)
        losses.append(metrics["loss"])
    n_trainable = sum(x.size for x in jax.tree.leaves(state.trainable))
    return Fit(state.variables, np.asarray(jax.device_get(losses), np.float64), n_trainable)


def merged_params(variables: Mapping, lora_cfg: LoraConfig | None = None) -> dict:
    """The base params with the adapters (if any) folded in: what the plain base model evaluates."""
    lora = variables.get("lora")
    if not lora:
        return variables["params"]
    if lora_cfg is None:
        raise ValueError("variables hold adapters: pass the LoraConfig they were trained with")
    return merge(variables["params"], lora, lora_cfg)


def val_loss(task: Task, variables: Mapping, lora_cfg: LoraConfig | None = None) -> float:
    """Mean validation loss over answer tokens (the first ``cfg.eval_batches`` batches), adapters merged first."""
    params = {"params": merged_params(variables, lora_cfg)}
    return mean_loss(task.eval_step, params, task.val, task.cfg.batch_size, max_batches=task.cfg.eval_batches)


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
        cfg = LoraConfig(r=r, alpha=float(r))  # merge scales an adapter of rank n by r / n: undone in B
        flat = {}
        for path, f in factors.items():
            n = min(r, f["A"].shape[0])
            flat[path] = {"A": f["A"][:n], "B": f["B"][:, :n] * (n / r)}
        out[r] = merge(base, unflatten_adapters(flat), cfg)
    return out
