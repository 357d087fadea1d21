"""What trains and how: the trainable mask, the partition it induces, and the AdamW optimizer.

The model's variables are ``{"params": base, "lora": adapters}``. A boolean mask of the same
structure says which leaves train: every adapter's factors (not the scale it carries), plus the
base leaves chosen with PEFT's ``bias`` and ``modules_to_save``. `partition` splits the variables
by the mask into two trees of the same structure, absent leaves as None::

    variables ──partition(mask)──> trainable  (frozen leaves None)  ── jax.grad, optax
                                   frozen     (trainable leaves None) ── read only
    combine(trainable, frozen) == variables

This is the Optax masking of the frozen base in its strongest form: the gradient is taken with
respect to `trainable` only, so no gradient of a frozen weight is computed, and the optimizer
is initialised on `trainable`, so it holds no state for a frozen leaf (``optax.masked`` would
still need the full gradient tree and pass the frozen entries through).

The optimizer is AdamW written as the chain optax's `adamw` is made of, with a global-norm
clip in front and the LoRA+ factor behind::

    clip_by_global_norm -> scale_by_adam -> add_decayed_weights(mask: ndim >= 2)
      -> partition({"A": 1, "B": loraplus_ratio, "base": 1}) -> scale_by_learning_rate(schedule)

Weight decay follows Hugging Face's Trainer, which PEFT users train with: decay on every matrix
(LoRA A and B, and any trainable kernel or embedding), none on biases and LayerNorm scales.
LoRA+ multiplies B's whole update, decay included, by the ratio, which is what a parameter
group with ``lr = ratio * lr`` does in ``torch.optim.AdamW``. (PEFT's ``create_loraplus_optimizer``
also puts trainable 1-D base leaves in B's group; jlora keeps base leaves at the base rate.)

>>> import jax.numpy as jnp
>>> adapter = {"A": jnp.ones((2, 4)), "B": jnp.zeros((12, 2)), "scaling": jnp.asarray(2.0)}
>>> variables = {"params": {"ln_f": {"scale": jnp.ones(4), "bias": jnp.zeros(4)}},
...              "lora": {"h": {"0": {"attn": {"c_attn": adapter}}}}}
>>> mask = trainable_mask(variables, bias="all")
>>> mask["params"]["ln_f"], mask["lora"]["h"]["0"]["attn"]["c_attn"]
({'bias': True, 'scale': False}, {'A': True, 'B': True, 'scaling': False})
>>> trainable, frozen = partition(variables, mask)
>>> frozen["params"]["ln_f"]["bias"] is None and trainable["params"]["ln_f"]["scale"] is None
True
>>> combine(trainable, frozen)["params"]["ln_f"]["scale"] is variables["params"]["ln_f"]["scale"]
True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import optax

from jlora.core.lora.adalora import AdaLoraConfig, add_orthogonal_gradient, allocate
from jlora.core.lora.adapter import SCALE, flatten_adapters, split_slice
from jlora.errors import ConfigError
from jlora.tree import path_names

PyTree = Any
SCHEDULES = ("cosine", "linear", "constant")
BIAS = ("none", "all", "lora_only")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup and decay, clipping, masked weight decay, accumulation and LoRA+.

    Attributes:
      lr: peak learning rate (of A, and of the base leaves that train).
      warmup_steps: linear warmup from 0 over this many updates (Hugging Face's convention:
        the first update of a warmed-up run has learning rate 0).
      total_steps: updates in the run; the decay reaches 0 here.
      schedule: after warmup, "cosine" or "linear" decay to 0, or "constant".
      weight_decay: decoupled decay (times the learning rate, as in torch's AdamW) on matrices.
      clip_norm: clip the gradient's global norm to this (None: no clipping).
      b1, b2, eps: Adam's moment decays and denominator epsilon (torch's defaults).
      grad_accum: micro-batches per update; the step takes them stacked in one batch.
      loraplus_ratio: LoRA+'s lambda, learning rate of B = lambda * learning rate of A (None: off).
      label_smoothing: eps in [0, 1) of PyTorch's label smoothing of the training loss, (1 - eps) CE +
        eps mean over the vocabulary of -log p (`jlora.core.update.loss.head_loss_sum`); the logged training
        loss is the smoothed one, the evaluation loss stays plain cross-entropy (0: off).
    """

    lr: float = 2e-4
    warmup_steps: int = 0
    total_steps: int = 1000
    schedule: str = "cosine"
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_accum: int = 1
    loraplus_ratio: float | None = None
    label_smoothing: float = 0.0

    def __post_init__(self):
        numbers = ("lr", "weight_decay", "b1", "b2", "eps", "clip_norm", "loraplus_ratio", "warmup_steps")
        for name in (*numbers, "label_smoothing"):
            value, optional = getattr(self, name), name in ("clip_norm", "loraplus_ratio")
            number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            if not (number or (optional and value is None)):
                raise ConfigError(f"{name} must be a finite number{' or None' if optional else ''}, got {value!r}")
        checks = [
            (self.lr > 0, f"lr must be > 0, got {self.lr!r}"),
            (self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}"),
            (0 <= self.warmup_steps, f"warmup_steps must be >= 0, got {self.warmup_steps!r}"),
            (self.total_steps > 0, f"total_steps must be > 0, got {self.total_steps!r}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}"),
            (self.clip_norm is None or self.clip_norm > 0, f"clip_norm must be > 0 or None, got {self.clip_norm!r}"),
            (0 <= self.b1 < 1 and 0 <= self.b2 < 1, f"b1 and b2 must be in [0, 1), got {self.b1!r}, {self.b2!r}"),
            (self.eps >= 0, f"eps must be >= 0, got {self.eps!r}"),
            (
                isinstance(self.grad_accum, int) and self.grad_accum >= 1,
                f"grad_accum must be >= 1, got {self.grad_accum!r}",
            ),
            (
                self.loraplus_ratio is None or self.loraplus_ratio > 0,
                f"loraplus_ratio must be > 0 or None, got {self.loraplus_ratio!r}",
            ),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def learning_rate(cfg: OptimConfig, lr: float | jax.Array | None = None) -> optax.Schedule:
    """The learning rate at each update: linear warmup from 0, then `cfg.schedule` down to 0.

    The same curves as transformers' ``get_{cosine,linear,constant}_schedule_with_warmup``.
    `lr` replaces ``cfg.lr`` as the peak; it may be a traced value (a population member's).

    >>> s = learning_rate(OptimConfig(lr=1e-3, warmup_steps=10, total_steps=110, schedule="linear"))
    >>> [round(float(s(t)), 6) for t in (0, 5, 10, 60, 110)]
    [0.0, 0.0005, 0.001, 0.0005, 0.0]
    """
    peak = cfg.lr if lr is None else lr
    decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
    decay = {
        "cosine": lambda: optax.cosine_decay_schedule(peak, decay_steps),
        "linear": lambda: optax.linear_schedule(peak, 0.0, decay_steps),
        "constant": lambda: optax.constant_schedule(peak),
    }[cfg.schedule]()
    if cfg.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def _suffix_match(name: str, path: tuple[str, ...]) -> bool:
    """Does `name` (dotted) name `path` or one of its enclosing modules, as a path suffix?"""
    for end in range(1, len(path) + 1):
        module = ".".join(path[:end])
        if module == name or module.endswith("." + name):
            return True
    return False


def trainable_mask(variables: Mapping, *, bias: str = "none", modules_to_save: Iterable[str] = ()) -> PyTree:
    """Which leaves of ``{"params": base, "lora": adapters}`` train: a tree of bools.

    Args:
      variables: the model's variables; every leaf under "lora" trains but the adapters' scales.
      bias: PEFT's ``bias``: "none" (no base leaf), "all" (every base bias, LayerNorm biases
        included), or "lora_only" (the biases of the modules that carry an adapter).
      modules_to_save: PEFT's ``modules_to_save``: base modules that train in full, named by a
        dotted path suffix, e.g. "ln_f", "wte" (also the tied LM head), "c_fc" (every block's),
        "h.0.mlp.c_fc".

    Raises:
      ValueError: `bias` is not one of the three, or a name matches no module.
    """
    if bias not in BIAS:
        raise ConfigError(f"unknown bias {bias!r}; valid: {', '.join(BIAS)}")
    modules_to_save = (modules_to_save,) if isinstance(modules_to_save, str) else tuple(modules_to_save)
    base_paths = [path_names(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(variables["params"])]
    for name in modules_to_save:
        if not any(_suffix_match(name, p) for p in base_paths):
            raise ConfigError(f"modules_to_save: no base module named {name!r}; e.g. ln_f, wte, c_fc, h.0.mlp.c_fc")
    adapted = {tuple(split_slice(p)[0].split(".")) for p in flatten_adapters(variables.get("lora", {}))}

    def base_leaf(keypath, _) -> bool:
        path = path_names(keypath)
        if any(_suffix_match(name, path) for name in modules_to_save):
            return True
        if path[-1] != "bias":
            return False
        return bias == "all" or (bias == "lora_only" and path[:-1] in adapted)

    return {
        collection: (
            jax.tree_util.tree_map_with_path(lambda kp, _: path_names(kp)[-1] != SCALE, tree)
            if collection == "lora"
            else jax.tree_util.tree_map_with_path(base_leaf, tree)
            if collection == "params"
            else jax.tree.map(lambda _: False, tree)
        )
        for collection, tree in variables.items()
    }


def partition(variables: PyTree, mask: PyTree) -> tuple[PyTree, PyTree]:
    """(trainable, frozen): `variables` split by `mask`, each with None where the other has a leaf."""
    trainable = jax.tree.map(lambda x, m: x if m else None, variables, mask)
    frozen = jax.tree.map(lambda x, m: None if m else x, variables, mask)
    return trainable, frozen


def combine(trainable: PyTree, frozen: PyTree) -> PyTree:
    """Inverse of `partition`: the leaf from whichever tree has one."""
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None)


def param_labels(tree: PyTree) -> PyTree:
    """LoRA+'s groups: "A" or "B" for LoRA leaves, "base" for everything else."""

    def label(keypath, _) -> str:
        path = path_names(keypath)
        return path[-1] if path[0] == "lora" and path[-1] in ("A", "B") else "base"

    return jax.tree_util.tree_map_with_path(label, tree)


def decay_mask(tree: PyTree) -> PyTree:
    """True on matrices (A, B, kernels, embeddings) and AdaLoRA's E (PEFT's lora_E is a (r, 1) matrix, which
    Hugging Face's Trainer decays), False on biases and LayerNorm scales."""
    return jax.tree_util.tree_map_with_path(lambda kp, x: x.ndim >= 2 or path_names(kp)[-1] == "E", tree)


def count_params(tree: PyTree) -> int:
    """Number of scalars in a tree's (present) leaves."""
    return sum(x.size for x in jax.tree.leaves(tree))


def make_optimizer(
    cfg: OptimConfig,
    trainable: PyTree,
    *,
    lr: float | jax.Array | None = None,
    loraplus_ratio: float | jax.Array | None = None,
    adalora: AdaLoraConfig | None = None,
) -> optax.GradientTransformation:
    """The AdamW chain (see the module doc) for the `trainable` partition of the variables.

    Its state mirrors `trainable`: Adam's two moments per trainable leaf and two step counts,
    nothing for a frozen leaf. Gradient accumulation is not in here: the train step sums the
    micro-batches' gradients and calls the optimizer once per update.

    `lr` and `loraplus_ratio` replace ``cfg``'s; they may be traced values (a population's
    members each have their own under one `vmap`, `jlora.core.update.population`).

    `adalora` (the run's ``adalora:`` section) puts AdaLoRA's training around the chain
    (`jlora.core.lora.adalora`): the orthogonality penalty's gradient first, and after the update the
    importance scores and the masking of E::

        add_orthogonal_gradient -> clip -> allocate(scale_by_adam -> decay -> LoRA+ -> learning rate)
    """
    if not jax.tree.leaves(trainable):
        raise ConfigError("nothing to train: the trainable partition has no leaves (is the LoRA tree empty?)")
    ratio = cfg.loraplus_ratio if loraplus_ratio is None else loraplus_ratio
    chain, update = [], []
    if adalora is not None and adalora.orth_reg_weight:
        chain.append(add_orthogonal_gradient(adalora.orth_reg_weight))
    if cfg.clip_norm is not None:
        chain.append(optax.clip_by_global_norm(cfg.clip_norm))
    update.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
    if cfg.weight_decay:
        update.append(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask))
    if ratio is not None:
        factors = {"A": optax.identity(), "B": optax.scale(ratio), "base": optax.identity()}
        update.append(optax.partition(factors, param_labels))
    update.append(optax.scale_by_learning_rate(learning_rate(cfg, lr)))
    if adalora is not None:
        return optax.chain(*chain, allocate(optax.chain(*update), adalora, cfg.total_steps))
    return optax.chain(*chain, *update)
