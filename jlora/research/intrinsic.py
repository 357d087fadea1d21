"""Training in a random d-dimensional subspace of the weights, theta = theta_0 + P z, for many d at once.

Li et al. (2018) call the intrinsic dimension of an objective the smallest d for which training
only z (d,), with P a fixed random D x d projection of unit columns and theta_0 the starting
weights, reaches 90 % of what training all D numbers reaches (d90). Aghajanyan et al. (2021)
measured it for language-model fine-tuning, with a Fastfood P (`jlora.research.fastfood`) and
SAID: one learned scale per weight, theta_w = theta_0,w + lambda_w (P z)_w, the scales counted in d::

    space = subspace(params, space_mask(params, lora_cfg))   # the leaves that move (D numbers): LoRA's weights
    pop = dims_population([16, 64, 256], space, lr=[0.1, 0.05, 0.02])   # K members, z padded to the widest
    proj = fastfood(key, space.size, pop.width)               # one P for all; member k reads its first d_k columns
    state = init_subspace(params, proj, pop, optim)           # z = 0: every member is the base model, exactly
    step = make_subspace_step(task_loss(model), space, optim, pop)   # one compiled step, vmapped over members
    state, metrics = step(state, batch, rng)                  # metrics["loss"]: (K,)
    member_params(state, k, pop, space)                       # member k's weights: any model evaluates them
    d90(pop.dims, losses, base_loss, full_loss)               # the smallest d with 90 % of full training's gain

    fit_subspace(task, space, proj, pop)                      # the loop on a task, as experiments.fit's for LoRA
    distill_subspace(model, params, teacher, space, proj, pop, key, optim, batch_size=16, seq_len=32)  # planted

Member k's z carries zeros beyond its own d_k. The forward pass multiplies z by a 0/1 mask, so
those entries' gradients are exactly 0 and Adam's update of them is 0 (masked again besides):
a member of the padded population is the member trained alone (at its own learning rate, a traced
value inside the vmap, as `jlora.core.update.population` gives adapters theirs). `Identity` in place of the
Fastfood projection trains the D numbers themselves (z = theta - theta_0): the full fine-tune
of the same weights, through the same step and optimizer.

The frozen partition holds theta_0 and P, shared by every member; the trainable one holds z
(K, W) and, with SAID, the scales (K, m), m the number of weights in the space.

>>> import jax, jax.numpy as jnp
>>> from jlora.core.update.optim import OptimConfig
>>> from jlora.research.fastfood import fastfood
>>> params = {"w": jnp.ones((4, 8)), "b": jnp.zeros(8)}
>>> space = subspace(params, {"w": True, "b": False})
>>> space.paths, space.size
(('w',), 32)
>>> pop = dims_population([2, 5], space)
>>> proj = fastfood(jax.random.key(0), space.size, pop.width)
>>> state = init_subspace(params, proj, pop, OptimConfig(lr=0.1))
>>> bool((member_params(state, 1, pop, space)["w"] == params["w"]).all())   # z = 0: the base, bit for bit
True
>>> d90([2, 5, 8], [3.0, 1.2, 1.1], base=4.0, full=1.0)   # 90 % of the gain 4 -> 1: loss <= 1.3
5
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jlora.core.analysis.divergence import kl_divergence
from jlora.core.lora.adapter import split_slice
from jlora.core.lora.config import LoraConfig
from jlora.core.models.gpt2 import GPT2
from jlora.core.update.loss import loss_sums
from jlora.core.update.optim import OptimConfig, make_optimizer, trainable_mask
from jlora.core.update.step import TrainState, step_inputs
from jlora.errors import ConfigError
from jlora.research import experiments as ex
from jlora.research.fastfood import Fastfood, project
from jlora.research.planted import random_tokens
from jlora.training.run.config import RunConfig, adapter_seed
from jlora.tree import get_path, leaves_by_path, replace_paths

PyTree = Any
Loss = Callable[[PyTree, Any, jax.Array], jax.Array]  # (params, batch, dropout key) -> scalar loss


class Identity(struct.PyTreeNode):
    """The projection P = I (D x D): z is the update itself, and training it is full fine-tuning."""

    size: int = struct.field(pytree_node=False)

    @property
    def block(self) -> int:
        return self.size


Projection = Fastfood | Identity


def apply_projection(proj: Projection, z: jax.Array) -> jax.Array:
    """P z, (D,), for z (d,) with d <= ``proj.block`` (shorter z: P's first d columns)."""
    if isinstance(proj, Identity):
        return jnp.pad(z.astype(jnp.float32), (0, proj.size - z.shape[-1]))
    return project(proj, z)


class Subspace(NamedTuple):
    """Which leaves of a params tree move, in tree order, and their shapes: P z is cut into them."""

    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(np.prod(s)) for s in self.shapes)

    @property
    def size(self) -> int:
        """D: the number of weights the subspace moves."""
        return sum(self.sizes)


def subspace(params: Mapping, mask: PyTree) -> Subspace:
    """The leaves of `params` where `mask` (a tree of bools of the same structure) is True."""
    chosen = [path for path, keep in leaves_by_path(mask).items() if keep]
    if not chosen:
        raise ConfigError("the subspace moves no weight: the mask selects no leaf of the model")
    leaves = leaves_by_path(params)
    return Subspace(tuple(chosen), tuple(tuple(leaves[p].shape) for p in chosen))


def space_mask(
    params: Mapping, lora_cfg: LoraConfig, *, bias: str = "none", modules_to_save: Sequence[str] = (), whole=False
) -> PyTree:
    """True on the weights a LoRA run with `lora_cfg` adapts (each target module's kernel) and on the
    base leaves it trains beside them (PEFT's `bias` and `modules_to_save`, as `trainable_mask`);
    with `whole`, on every leaf of the model."""
    if whole:
        return jax.tree.map(lambda _: True, params)
    plain_bias = "none" if bias == "lora_only" else bias  # lora_only: the adapted modules' biases, below
    mask = trainable_mask({"params": params}, bias=plain_bias, modules_to_save=modules_to_save)["params"]
    modules = {split_slice(p)[0] for p in lora_cfg.module_paths(params)}
    chosen = {f"{m}.kernel": True for m in modules}
    if bias == "lora_only":
        chosen |= {f"{m}.bias": True for m in modules}
    return replace_paths(mask, chosen)


class Dims(NamedTuple):
    """K members of a subspace population, one d each.

    Attributes:
      dims: (K,) d_k, the numbers member k trains (its z, and with SAID the m scales).
      width: W, the longest z (z has d_k - m entries with SAID).
      mask: (K, W) float32, 1 on member k's own entries of z.
      n_scales: m with SAID (one scale per weight of the space), else 0.
      lr: (K,) float32 peak learning rates, one per member; None: the optimizer config's for all.
    """

    dims: tuple[int, ...]
    width: int
    mask: jax.Array
    n_scales: int
    lr: jax.Array | None = None

    @property
    def size(self) -> int:
        return len(self.dims)


def dims_population(
    dims: Sequence[int], space: Subspace, *, said: bool = False, lr: Sequence[float] | None = None
) -> Dims:
    """The `Dims` of members training d in `dims` numbers each on `space`, member k at learning rate
    ``lr[k]`` (None: the optimizer config's).

    Raises ConfigError for a d that is not an integer in [1, D] (with SAID: above m, the scales' count).
    """
    dims = tuple(dims)
    m = len(space.paths) if said else 0
    if not dims:
        raise ConfigError("a subspace population needs at least one d")
    for d in dims:
        if not (isinstance(d, int | np.integer) and m < d <= space.size):
            low = f"{m + 1} (SAID's {m} scales + 1)" if said else "1"
            raise ConfigError(f"subspace dimension d={d!r} is out of range; valid: {low} .. D = {space.size}")
    if lr is not None and len(lr) != len(dims):
        raise ConfigError(f"{len(lr)} learning rates for {len(dims)} subspace dimensions")
    sizes = [int(d) - m for d in dims]
    width = max(sizes)
    mask = np.arange(width)[None, :] < np.asarray(sizes)[:, None]
    rates = None if lr is None else jnp.asarray(lr, jnp.float32)
    return Dims(tuple(int(d) for d in dims), width, jnp.asarray(mask, jnp.float32), m, rates)


def subspace_params(
    params: Mapping, space: Subspace, proj: Projection, z: jax.Array, scales: jax.Array | None = None
) -> dict:
    """theta_0 + P z cut into the space's leaves: `params` with each moved leaf replaced (the rest kept).

    z: (d,) with d <= ``proj.block``; scales: (m,) SAID's one per leaf of the space, or None.
    """
    delta = apply_projection(proj, z)
    offsets = np.cumsum((0, *space.sizes))
    moved = {}
    for i, (path, shape) in enumerate(zip(space.paths, space.shapes, strict=True)):
        piece = delta[offsets[i] : offsets[i + 1]].reshape(shape)
        if scales is not None:
            piece = scales[i] * piece
        leaf = get_path(params, path)
        moved[path] = (leaf.astype(jnp.float32) + piece).astype(leaf.dtype)
    return replace_paths(params, moved)


def _trainable(pop: Dims) -> dict:
    z = {"z": jnp.zeros((pop.size, pop.width), jnp.float32)}
    return z | ({"scales": jnp.ones((pop.size, pop.n_scales), jnp.float32)} if pop.n_scales else {})


def subspace_optimizer(cfg: OptimConfig, pop: Dims, lr: jax.Array | None = None) -> optax.GradientTransformation:
    """One member's AdamW at peak `lr` (`make_optimizer`: clipping, warmup and decay; no weight decay on z,
    a vector); `lr` may be traced (inside the population's vmap)."""
    return make_optimizer(cfg, jax.tree.map(lambda x: x[0], _trainable(pop)), lr=lr)


def _rates(cfg: OptimConfig, pop: Dims) -> jax.Array:
    return jnp.full((pop.size,), cfg.lr, jnp.float32) if pop.lr is None else pop.lr


def init_subspace(params: Mapping, proj: Projection, pop: Dims, cfg: OptimConfig) -> TrainState:
    """Step 0: z = 0 (SAID scales 1) for every member, so each is the base model; the optimizer states."""
    trainable = _trainable(pop)
    opt_state = jax.vmap(lambda t, lr: subspace_optimizer(cfg, pop, lr).init(t))(trainable, _rates(cfg, pop))
    return TrainState(jnp.zeros((), jnp.int32), trainable, {"params": params, "proj": proj}, opt_state)


def member_params(state: TrainState, k: int, pop: Dims, space: Subspace) -> dict:
    """Member k's weights theta_0 + P z_k: a plain params tree."""
    scales = state.trainable["scales"][k] if pop.n_scales else None
    z = state.trainable["z"][k] * pop.mask[k]
    return subspace_params(state.frozen["params"], space, state.frozen["proj"], z, scales)


def make_subspace_step(
    loss: Loss, space: Subspace, cfg: OptimConfig, pop: Dims
) -> Callable[[TrainState, Any, jax.Array], tuple[TrainState, dict]]:
    """One compiled update of every member: ``step(state, batch, rng) -> (state, {"loss": (K,)})``.

    `loss(params, batch, key)` is one model's loss on the batch (`task_loss`, `distill_loss`);
    every member reads the same batch and the dropout key ``fold_in(rng, step)``; each
    differentiates its own loss with respect to its own z (and scales) and applies its own AdamW
    (at its own learning rate, ``pop.lr``). The state's trainable leaves and optimizer state are donated.
    """

    def member(trainable, opt_state, mask, lr, frozen, batch, key):
        optimizer = subspace_optimizer(cfg, pop, lr)

        def objective(t):
            params = subspace_params(frozen["params"], space, frozen["proj"], t["z"] * mask, t.get("scales"))
            return loss(params, batch, key)

        value, grads = jax.value_and_grad(objective)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        updates = {**updates, "z": updates["z"] * mask}  # the padding of a shorter z stays exactly 0
        return optax.apply_updates(trainable, updates), opt_state, value

    members = jax.vmap(member, in_axes=(0, 0, 0, 0, None, None, None))
    rates = _rates(cfg, pop)

    @partial(jax.jit, donate_argnums=(0, 1, 2))
    def update(step, trainable, opt_state, mask, lr, frozen, batch, rng):
        key = jax.random.fold_in(rng, step)
        trainable, opt_state, values = members(trainable, opt_state, mask, lr, frozen, batch, key)
        return step + 1, trainable, opt_state, values

    def step(state: TrainState, batch: Any, rng: jax.Array) -> tuple[TrainState, dict]:
        n, trainable, opt_state, values = update(
            state.step, state.trainable, state.opt_state, pop.mask, rates, state.frozen, batch, rng
        )
        return TrainState(n, trainable, state.frozen, opt_state), {"loss": values}

    return step


def task_loss(model: GPT2) -> Loss:
    """A language-model batch's mean masked next-token loss (`jlora.core.update.loss`), with `model`'s dropout."""

    def loss(params, batch, key):
        total, tokens = loss_sums(model, {"params": params}, step_inputs(batch), key)
        return total / jnp.maximum(tokens, 1.0)

    return loss


def distill_loss(model: GPT2) -> Loss:
    """Mean KL(teacher || model) over a batch ``(teacher_params, ids)``: the planted-rank students' loss.

    The teacher's logits depend on no member's weights, so under the population's vmap they are
    computed once for all members.
    """

    def loss(params, batch, key):
        del key  # the students train without dropout, as `jlora.research.planted`'s
        teacher_params, ids = batch
        target = jax.lax.stop_gradient(model.apply({"params": teacher_params}, ids))
        return jnp.mean(kl_divergence(target, model.apply({"params": params}, ids)))

    return loss


def fit_subspace(
    task: ex.Task,
    space: Subspace,
    proj: Projection,
    pop: Dims,
    cfg: RunConfig | None = None,
    *,
    progress: bool = False,
    desc: str | None = None,
) -> tuple[TrainState, np.ndarray]:
    """Train every member of `pop` on `task` as `jlora.research.experiments.fit` trains an adapter: the
    run's batches, steps, AdamW schedule (at each member's ``pop.lr``, default the run's) and dropout keys.

    Returns:
      (the final state, training losses (steps, K)).
    """
    cfg = cfg or task.cfg
    optim = cfg.optim
    state = init_subspace(task.run.params, proj, pop, optim)
    step = make_subspace_step(task_loss(task.base_model), space, optim, pop)
    runner = ex.Runner(state, step, jax.random.key(adapter_seed(cfg)))
    return ex.run_steps(task, runner, cfg, progress=progress, desc=desc)


def distill_subspace(
    model: GPT2,
    params: PyTree,
    teacher_params: PyTree,
    space: Subspace,
    proj: Projection,
    pop: Dims,
    key: jax.Array,
    optim: OptimConfig,
    *,
    batch_size: int,
    seq_len: int,
    progress: bool = False,
    step: Callable | None = None,
) -> tuple[TrainState, np.ndarray]:
    """Train every member towards the teacher, as `jlora.research.planted.distill_students` trains
    LoRA students: ``optim.total_steps`` steps on random tokens from ``fold_in(key, 1)`` (the same
    tokens the LoRA students of that key see), loss KL(teacher || member).

    `step` is ``make_subspace_step(distill_loss(model), space, optim, pop)`` made once and passed to
    every call, so that distilling several teachers compiles it once (default: made here).

    Returns:
      (the final state, training losses (K, steps)).
    """
    from tqdm.auto import trange

    state = init_subspace(params, proj, pop, optim)
    step = step or make_subspace_step(distill_loss(model), space, optim, pop)
    tokens, vocab = jax.random.fold_in(key, 1), model.config.vocab_size
    losses = []
    for i in trange(optim.total_steps, disable=not progress, desc=f"{pop.size} subspaces", leave=False):
        ids = random_tokens(jax.random.fold_in(tokens, i), batch_size, seq_len, vocab)
        state, metrics = step(state, (teacher_params, ids), key)
        losses.append(metrics["loss"])
    return state, np.asarray(jax.device_get(losses), np.float64).T


def recovered(losses: Sequence[float], base: float, full: float) -> np.ndarray:
    """Each loss's share of full training's gain, (base - loss) / (base - full): 0 the base, 1 full training."""
    return (base - np.asarray(losses, np.float64)) / (base - full)


def d90(dims: Sequence[int], losses: Sequence[float], base: float, full: float, *, share: float = 0.9) -> int | None:
    """The smallest d whose loss has `share` of full training's gain over the base (None: no d has).

    Lower losses are better; `base` is the untrained model's, `full` the full fine-tune's.
    """
    if not base > full:
        return None  # full training gained nothing: no share of it to reach
    reached = [d for d, r in zip(dims, recovered(losses, base, full), strict=True) if r >= share]
    return min(reached, default=None)
