"""AdaLoRA (Zhang et al. 2023, arXiv 2303.10512): an SVD-shaped update whose rank budget moves to the
triplets that matter, as PEFT's ``peft/tuners/adalora`` computes it, inside the compiled step.

The adapter (``LoraConfig(init="adalora", r=init_r)``) holds a third factor, the "singular values" E::

    {"A": (r, d_in), "E": (r,), "B": (d_out, r), "scaling": ()}      h += scaling * B diag(E) A x
    A, B ~ N(0, 0.02),  E = 0,  scaling = lora_alpha / (init_r + 1e-5)   (PEFT's lora_alpha / ranknum)

It is a plain LoRA of A' = diag(E) A (`jlora.core.lora.adapter.factors`), so the forward pass, merging and
the spectrum read it as one. Training adds two things, both optax transformations around the AdamW chain
(`jlora.core.update.optim.make_optimizer`), so the train step itself does not change:

    add_orthogonal_gradient   the gradient of orth_reg_weight * mean(||A A^T - I||_F, ||B^T B - I||_F)
    allocate                  after each update: importance |p * g| of every entry of A, E, B, smoothed
                              (EMA beta1) and its uncertainty |I - EMA| (EMA beta2); a triplet's score is
                              the mean over A's row and B's column of ipt * unc, plus E's; at the steps the
                              budget schedule says, the lowest scores' E entries are set to 0

The budget (the number of triplets left, over all modules) follows PEFT's cubic schedule from init_r to
target_r per module: init_r * n until ``tinit``, then ``int((init - target) (1 - t')^3 + target)`` with
t' = (step - tinit) / (T - tfinal - tinit), masking every ``deltaT`` steps; at T - tfinal the mask is fixed
and held through the last ``tfinal`` steps. `budget_schedule` makes it on the host, one integer a step (in
Python's float64, as PEFT's), and the step reads it: masks change values, never shapes.

Step t of jlora is PEFT's ``update_and_allocate(t)`` called after the t-th optimizer step (0-based), as in
PEFT's examples. Exported, the adapter keeps the triplets whose E is not 0 (`kept`): PEFT's format prunes
by its last mask (``rank_pattern``), which is the same set after a mask and throughout the final phase.

>>> budgets, masks = budget_schedule(AdaLoraConfig(init_r=12, target_r=4, tinit=2, tfinal=2, total_step=10), 3)
>>> budgets.tolist()
[36, 36, 36, 25, 19, 15, 12, 12, 12, 12, 12]
>>> masks.tolist()
[False, False, False, True, True, True, True, True, True, True, True]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlora.core.lora.adapter import flatten_adapters, unflatten_adapters
from jlora.errors import ConfigError

PyTree = Any
EPS = 1e-5  # PEFT's ranknum + 1e-5
TRIPLET = ("A", "E", "B")


@dataclasses.dataclass(frozen=True)
class AdaLoraConfig:
    """The run config's ``adalora:`` section: PEFT's ``AdaLoraConfig`` keys and defaults.

    Attributes:
      init_r: each module's rank at the start (the adapters' r).
      target_r: the average rank per module the budget ends at.
      tinit: steps of warm-up before any masking.
      tfinal: steps at the end with the final mask held.
      deltaT: mask every this many steps while the budget falls.
      beta1, beta2: the EMAs of the importance and of its uncertainty.
      orth_reg_weight: the weight of the orthogonality penalty on A and B.
      total_step: the schedule's length (None: the run's steps).
    """

    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 (PEFT's key)
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None

    def __post_init__(self):
        ints = {"init_r": 1, "target_r": 1, "tinit": 0, "tfinal": 0, "deltaT": 1}
        for name, low in ints.items():
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.target_r > self.init_r:
            raise ConfigError(f"target_r={self.target_r} must be <= init_r={self.init_r}")
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in (0, 1), got {getattr(self, name)!r}")
        if not self.orth_reg_weight >= 0:
            raise ConfigError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        if self.total_step is not None and self.total_step <= 0:
            raise ConfigError(f"total_step must be > 0 or null (the run's steps), got {self.total_step!r}")

    def steps(self, run_steps: int | None = None) -> int:
        """T, the schedule's length: ``total_step``, else the run's steps; checked to leave a budgeting phase."""
        total = run_steps if self.total_step is None else self.total_step
        if total is None:
            raise ConfigError("adalora.total_step is null: give the run's steps")
        if self.tinit + self.tfinal >= total:
            raise ConfigError(
                f"adalora.tinit={self.tinit} + tfinal={self.tfinal} must be < the schedule's {total} steps "
                "(no step would be left to lower the budget)"
            )
        return total


def budget_schedule(cfg: AdaLoraConfig, n_modules: int, run_steps: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(budgets (T + 1,) int32, masks (T + 1,) bool): PEFT's ``budget_schedule`` at steps 0..T, and whether step
    t masks (its ``mask_ind``, or the forced mask at T - tfinal); T = ``cfg.steps(run_steps)``."""
    total = cfg.steps(run_steps)
    init, target = cfg.init_r * n_modules, cfg.target_r * n_modules
    budgets, masks = [], []
    for step in range(total + 1):
        if step <= cfg.tinit:
            budget, mask = init, False
        elif step > total - cfg.tfinal:
            budget, mask = target, True
        else:
            coeff = 1 - (step - cfg.tinit) / (total - cfg.tfinal - cfg.tinit)
            budget, mask = int((init - target) * (coeff**3) + target), step % cfg.deltaT == 0
        budgets.append(budget)
        masks.append(mask or step == total - cfg.tfinal)
    return np.asarray(budgets, np.int32), np.asarray(masks, bool)


def svd_adapters(lora: Mapping) -> dict[str, dict]:
    """{path: adapter} of the SVD-shaped adapters (those holding E) in a LoRA tree, or of its trainable part."""
    return {p: a for p, a in flatten_adapters(lora).items() if a.get("E") is not None}


def orthogonality(lora: Mapping) -> jax.Array:
    """PEFT's penalty: the mean over every A and B of ||A A^T - I||_F and ||B^T B - I||_F (0 without adapters)."""
    terms = []
    for adapter in svd_adapters(lora).values():
        a, b = adapter["A"].astype(jnp.float32), adapter["B"].astype(jnp.float32)
        eye = jnp.eye(a.shape[0], dtype=jnp.float32)
        terms += [jnp.linalg.norm(a @ a.T - eye), jnp.linalg.norm(b.T @ b - eye)]
    return sum(terms) / len(terms) if terms else jnp.zeros((), jnp.float32)


def add_orthogonal_gradient(weight: float) -> optax.GradientTransformation:
    """Adds ``weight * grad(orthogonality)`` to the gradient of the variables' "lora" part: PEFT adds the penalty
    to the loss, so its gradient reaches the optimizer (and the importance scores) as this sum."""

    def update(grads, state, params):
        penalty = jax.grad(orthogonality)(params["lora"])
        lora = jax.tree.map(lambda g, p: g + weight * p, grads["lora"], penalty)
        return {**grads, "lora": lora}, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class AllocatorState(NamedTuple):
    """The allocator's state beside the inner optimizer's: the two EMAs of every entry of A, E and B, the
    mask fixed at T - tfinal ({path: (r,) bool}), and the step."""

    inner: optax.OptState
    ipt: dict
    unc: dict
    final: dict
    count: jax.Array


def scores(ipt: Mapping, unc: Mapping) -> dict[str, jax.Array]:
    """{path: (r,)} each triplet's score (PEFT's ``mask_to_budget``): the element scores ipt * unc, averaged over
    A's row and B's column, plus E's."""
    out = {}
    for path in ipt:
        s = {k: ipt[path][k] * unc[path][k] for k in TRIPLET}
        out[path] = s["E"] + s["A"].mean(axis=1) + s["B"].mean(axis=0)
    return out


def mask_to_budget(triplet_scores: Mapping[str, jax.Array], budget: jax.Array) -> dict[str, jax.Array]:
    """{path: (r,) keep}: every triplet but those whose score is at most the k-th smallest, k = total - budget
    (PEFT's ``kthvalue`` threshold; ties at it are masked too; k = 0 masks nothing)."""
    every = jnp.concatenate([s for s in triplet_scores.values()])
    k = every.shape[0] - budget
    threshold = jnp.where(k > 0, jnp.sort(every)[jnp.maximum(k - 1, 0)], -jnp.inf)
    return {p: s > threshold for p, s in triplet_scores.items()}


def allocate(inner: optax.GradientTransformation, cfg: AdaLoraConfig, run_steps: int) -> optax.GradientTransformation:
    """`inner` (Adam, decay, learning rate) followed by PEFT's ``update_and_allocate``: the importance of the
    updated values and the masking of E, at every step, inside the compiled update."""
    total = cfg.steps(run_steps)

    def init(params):
        adapters = svd_adapters(params["lora"])
        zeros = lambda: {p: {k: jnp.zeros_like(a[k]) for k in TRIPLET} for p, a in adapters.items()}  # noqa: E731
        final = {p: jnp.ones(a["E"].shape, bool) for p, a in adapters.items()}
        return AllocatorState(inner.init(params), zeros(), zeros(), final, jnp.zeros((), jnp.int32))

    def update(grads, state, params):
        updates, inner_state = inner.update(grads, state.inner, params)
        adapters, moves, slopes = (svd_adapters(t["lora"]) for t in (params, updates, grads))
        budgets, masks = budget_schedule(cfg, len(adapters), total)
        step = jnp.minimum(state.count, total)
        learning = step < total - cfg.tfinal
        new = {p: {k: adapters[p][k] + moves[p][k] for k in TRIPLET} for p in adapters}
        ipt, unc = {}, {}
        for p in adapters:
            ipt[p], unc[p] = {}, {}
            for k in TRIPLET:
                now = jnp.abs(new[p][k] * slopes[p][k])
                avg = cfg.beta1 * state.ipt[p][k] + (1 - cfg.beta1) * now
                spread = cfg.beta2 * state.unc[p][k] + (1 - cfg.beta2) * jnp.abs(now - avg)
                ipt[p][k] = jnp.where(learning, avg, state.ipt[p][k])
                unc[p][k] = jnp.where(learning, spread, state.unc[p][k])
        keep = mask_to_budget(scores(ipt, unc), jnp.asarray(budgets)[step])
        held = step > total - cfg.tfinal
        keep = {p: jnp.where(held, state.final[p], keep[p]) for p in keep}
        final = {p: jnp.where(step == total - cfg.tfinal, keep[p], state.final[p]) for p in keep}
        masking = jnp.asarray(masks)[step]
        flat = flatten_adapters(updates["lora"])
        for p in adapters:  # a masked E moves to 0 exactly: E + (-E)
            flat[p] = {**flat[p], "E": jnp.where(masking & ~keep[p], -adapters[p]["E"], moves[p]["E"])}
        updates = {**updates, "lora": unflatten_adapters(flat)}
        return updates, AllocatorState(inner_state, ipt, unc, final, state.count + 1)

    return optax.GradientTransformation(init, update)


def kept(adapter: Mapping) -> jax.Array:
    """(r,) the triplets an exported adapter keeps: those whose E is not 0 (all of them if every E is 0)."""
    alive = jnp.asarray(adapter["E"]) != 0
    return alive if bool(alive.any()) else jnp.ones_like(alive)


def as_plain(lora: Mapping) -> tuple[dict, dict[str, int]]:
    """(plain LoRA tree, {path: rank}): each SVD-shaped adapter as A' = diag(E) A and B on its kept triplets (rank
    0: dropped), with its scale; the same update, an ordinary adapter."""
    flat, ranks = {}, {}
    for path, adapter in flatten_adapters(lora).items():
        if "E" not in adapter:
            flat[path] = adapter
            continue
        keep = np.asarray(adapter["E"]) != 0
        ranks[path] = int(keep.sum())
        if ranks[path]:
            a = jnp.asarray(adapter["A"])[keep] * jnp.asarray(adapter["E"])[keep][:, None]
            rest = {k: v for k, v in adapter.items() if k not in TRIPLET}
            flat[path] = {**rest, "A": a, "B": jnp.asarray(adapter["B"])[:, keep]}
    return unflatten_adapters(flat), ranks
