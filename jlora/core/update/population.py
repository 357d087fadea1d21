"""A population of adapters on one frozen base, trained together by one compiled step.

K members, each an ordinary LoRA adapter whose rank, alpha, rsLoRA, initialisation, dropout key,
learning rate and LoRA+ ratio may differ, share the frozen base and every batch. Their trees are
stacked along a leading member axis and the solo `train_step` runs under `jax.vmap` over that
axis, the base and the batch unmapped: the base is held once, and each member has its own loss,
gradients and optimizer state::

    member k     lora_k  {"A": (r_k, d_in), "B": (d_out, r_k), "scaling": ()}    scaling_k = alpha_k / r_k
    stacked      lora    {"A": (K, R, d_in), "B": (K, d_out, R), "scaling": (K,)}  R = max_k r_k, per module
                 rows r_k.. of A_k and columns r_k.. of B_k are zero and stay zero: their
                 gradients are exactly zero (each is multiplied by the other's zeros), and the
                 rank mask (`keep_rank`) drops their updates besides; each member's scale is the
                 one its adapter was built with (from its true rank r_k), stacked like its factors
    variables    {"params": base (shared), "lora": (K, ...)}
    step(state, batch, keys (K,))  =  vmap over k of train_step(member k's optimizer, dropout key k)

Base leaves that train (PEFT's ``modules_to_save``, say ln_f) train per member: the stacked
trainable partition holds a copy for each. `split_member` takes member k back out as an ordinary
tree of its true rank, for export, merging, diagnosis or generation.

>>> import jax, jax.numpy as jnp, jlora
>>> config = jlora.GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2)
>>> params = jlora.init_params(jax.random.key(0), config)
>>> members = [Member(jlora.LoraConfig(r=r, alpha=2 * r), lr=lr) for r, lr in ((1, 1e-2), (4, 3e-3))]
>>> pop = population(members, params)
>>> loras = [jlora.init_lora(jax.random.key(k), m.lora, params) for k, m in enumerate(members)]
>>> variables = stack_variables(params, loras, pop)
>>> jax.tree.map(jnp.shape, variables["lora"]["h"]["0"]["attn"]["c_attn"])
{'A': (2, 4, 8), 'B': (2, 24, 4), 'scaling': (2,)}
>>> mask = jlora.trainable_mask(variables)
>>> member = split_member(variables, 0, pop, member_axes(mask))  # {"params", "lora"}
>>> member["lora"]["h"]["0"]["attn"]["c_attn"]["A"].shape, member["params"]["wte"] == params["wte"]
((1, 8), True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlora.core.lora.adapter import flatten_adapters, unflatten_adapters
from jlora.core.lora.config import LoraConfig
from jlora.core.update.loss import loss_sums
from jlora.core.update.mesh import Placement, mesh_placement
from jlora.core.update.optim import OptimConfig, combine, learning_rate, make_optimizer, partition
from jlora.core.update.step import (
    EvalStep,
    TrainState,
    TrainStep,
    compile_eval,
    compile_update,
    split_rows,
    train_step,
)
from jlora.errors import ConfigError

PyTree = Any
STACKED = ("lora",)  # collections with a member axis; in "params" only the trained leaves have one


@dataclasses.dataclass(frozen=True)
class Member:
    """What one member of a population is: its adapters' config, its learning rate and LoRA+ ratio, its
    adapter seed (A's initialisation and its dropout keys) and its name (what was given for it: ``r=4,alpha=8``).

    Members of one population must adapt the same modules with the same LoRA dropout rate;
    rank (``r``, ``rank_pattern``), alpha, rsLoRA and initialisation may differ. The run config's
    ``population:`` section resolves to these (`jlora.training.run.members`); a checkpoint's meta keeps
    each one's `to_dict`.
    """

    lora: LoraConfig
    lr: float
    loraplus_ratio: float | None = None
    seed: int = 0
    name: str = ""

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "lora_config": self.lora.to_dict(),
            "lr": self.lr,
            "loraplus_ratio": self.loraplus_ratio,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Member:
        return cls(LoraConfig.from_dict(d["lora_config"]), d["lr"], d["loraplus_ratio"], d["seed"], d["name"])


class Population(NamedTuple):
    """K members and what the compiled step reads of them (arrays with a leading axis K).

    Attributes:
      members: the K `Member`s.
      ranks: {adapter path: R}, the padded rank, the largest member's there.
      lr: (K,) float32 peak learning rates.
      loraplus_ratio: (K,) float32 LoRA+ ratios (1 for a member without), or None when no member has one.
      rank_mask: like the stacked LoRA tree, {"A": (K, R, 1), "B": (K, 1, R)} bool: True on member k's
        own r_k rows of A and columns of B.
    """

    members: tuple[Member, ...]
    ranks: dict[str, int]
    lr: jax.Array
    loraplus_ratio: jax.Array | None
    rank_mask: PyTree

    @property
    def size(self) -> int:
        return len(self.members)


def population(members: Sequence[Member], params: Mapping) -> Population:
    """The `Population` of `members` on the base `params` (only its structure is read).

    Raises ConfigError when the members adapt different modules or use different LoRA dropout rates.
    """
    members = tuple(members)
    if not members:
        raise ConfigError("a population needs at least one member")
    paths = members[0].lora.module_paths(params)
    for k, m in enumerate(members[1:], 1):
        if m.lora.module_paths(params) != paths:
            raise ConfigError(f"population member {k} adapts other modules than member 0; members may differ in rank")
        if m.lora.dropout != members[0].lora.dropout:
            raise ConfigError(
                f"population member {k} has LoRA dropout {m.lora.dropout}, member 0 {members[0].lora.dropout}"
            )
    ratios = [m.loraplus_ratio for m in members]
    return Population(
        members=members,
        ranks=_ranks(members, paths),
        lr=jnp.asarray([m.lr for m in members], jnp.float32),
        loraplus_ratio=None if all(x is None for x in ratios) else jnp.asarray([x or 1.0 for x in ratios], jnp.float32),
        rank_mask=_rank_mask(members, _ranks(members, paths)),
    )


def _ranks(members: Sequence[Member], paths) -> dict[str, int]:
    return {p: max(m.lora.rank_for(p) for m in members) for p in paths}


def _rank_mask(members: Sequence[Member], ranks: Mapping[str, int]) -> dict:
    masks = {
        p: {
            "A": np.stack([np.arange(r)[:, None] < m.lora.rank_for(p) for m in members]),  # (K, R, 1)
            "B": np.stack([np.arange(r)[None, :] < m.lora.rank_for(p) for m in members]),  # (K, 1, R)
        }
        for p, r in ranks.items()
    }
    return unflatten_adapters({p: jax.tree.map(jnp.asarray, m) for p, m in masks.items()})


def subset(pop: Population, positions: Sequence[int]) -> Population:
    """The members at `positions` as a population of their own (a search's survivors).

    Each keeps its settings; the padded ranks shrink to the largest kept member's. LoRA+ ratios stay
    an array when the population had any, so the optimizer state keeps its structure (`take_members`).
    """
    members = tuple(pop.members[i] for i in positions)
    if not members:
        raise ConfigError("a population needs at least one member")
    index = np.asarray(positions)
    ranks = _ranks(members, pop.ranks)
    return Population(
        members=members,
        ranks=ranks,
        lr=pop.lr[index],
        loraplus_ratio=None if pop.loraplus_ratio is None else pop.loraplus_ratio[index],
        rank_mask=_rank_mask(members, ranks),
    )


def take_members(tree: PyTree, positions: Sequence[int], like: PyTree) -> PyTree:
    """Members `positions` of a stacked tree (a trainable partition, an optimizer state), each leaf cut
    to the shape of `like`'s: the same tree for the `subset` population, whose padded ranks may be smaller.

    Cutting is exact: past a member's own rank its A rows, B columns and their optimizer moments are 0.
    """
    index = np.asarray(positions)

    def pick(x, shape_of):
        x = x[index]
        return x if x.shape == shape_of.shape else x[tuple(slice(0, n) for n in shape_of.shape)]

    return jax.tree.map(pick, tree, like)


def put_members(full: PyTree, tree: PyTree, positions: Sequence[int]) -> PyTree:
    """`full` (a stacked host tree of every member, numpy) with members `positions` replaced by `tree`'s,
    zero-padded to `full`'s ranks: the inverse of `take_members`, into a copy."""
    index = np.asarray(positions)

    def put(whole, part):
        whole, part = np.array(whole), np.asarray(part)
        whole[index] = 0
        whole[(index, *(slice(0, n) for n in part.shape[1:]))] = part
        return whole

    return jax.tree.map(put, full, tree)


def pad_lora(lora: Mapping, ranks: Mapping[str, int]) -> dict:
    """`lora` with each adapter zero-padded to rank ``ranks[path]``: A (R, d_in), B (d_out, R); its scale
    (from its own rank) and any other leaf as they are."""
    padded = {}
    for path, adapter in flatten_adapters(lora).items():
        extra = ranks[path] - adapter["A"].shape[0]
        padded[path] = {
            **adapter,
            "A": jnp.pad(adapter["A"], ((0, extra), (0, 0))),
            "B": jnp.pad(adapter["B"], ((0, 0), (0, extra))),
        }
    return unflatten_adapters(padded)


def stack_variables(params: Mapping, loras: Sequence[Mapping], pop: Population) -> dict:
    """The population's variables: ``{"params": params, "lora": (K, ...) padded}``.

    Args:
      params: the shared base tree.
      loras: one adapter tree per member, each of its own ranks and scales (e.g. from `init_lora` with its
        config).
    """
    if len(loras) != pop.size:
        raise ValueError(f"{len(loras)} LoRA trees for a population of {pop.size}")
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[pad_lora(lora, pop.ranks) for lora in loras])
    return {"params": params, "lora": stacked}


def member_axes(mask: Mapping) -> dict:
    """`jax.vmap` in_axes for a population's variables: 0 on stacked leaves, None on the shared base.

    `mask` is the variables' `trainable_mask` (trained base leaves are stacked, frozen ones shared).
    """
    return {
        c: (0 if c in STACKED else jax.tree.map(lambda trained: 0 if trained else None, tree))
        for c, tree in mask.items()
    }


def member_variables(state: TrainState, k: int, pop: Population) -> dict:
    """Member k as an ordinary model's variables, ``{"params": base with its trained leaves, "lora": its own}``."""
    lora = member_lora(combine(state.trainable["lora"], state.frozen["lora"]), k, pop.members[k].lora)
    return {"params": combine(take(state.trainable["params"], k), state.frozen["params"]), "lora": lora}


def member_lora(stacked: Mapping, k: int, cfg: LoraConfig) -> dict:
    """Member k's adapters at their true ranks (``cfg.rank_for``): the padding cut off; its scale (and any
    other leaf) its own slice."""
    flat = {}
    for path, adapter in flatten_adapters(stacked).items():
        r = cfg.rank_for(path)
        rest = {name: None if x is None else x[k] for name, x in adapter.items() if name not in ("A", "B")}
        flat[path] = {**rest, "A": adapter["A"][k, :r], "B": adapter["B"][k, :, :r]}
    return unflatten_adapters(flat)


def split_member(tree: Mapping, k: int, pop: Population, axes: PyTree = 0) -> dict:
    """Member k of a stacked tree with a "lora" entry: its LoRA tree at its true ranks, and the k-th
    slice of every other leaf.

    `tree` is a trainable partition or a checkpoint's ``{"lora", "base"}`` (every leaf stacked,
    `axes` 0), or a population's variables with ``axes=member_axes(mask)`` (shared leaves kept).
    """
    rest = {c: t for c, t in tree.items() if c != "lora"}
    rest_axes = axes if axes == 0 else {c: a for c, a in axes.items() if c != "lora"}
    return {**take(rest, k, rest_axes), "lora": member_lora(tree["lora"], k, pop.members[k].lora)}


def take(tree: PyTree, k: int, axes: PyTree = 0) -> PyTree:
    """The k-th member of a stacked tree: slice k of each leaf along its member axis; `axes` is 0,
    or a tree prefix of 0 / None as from `member_axes` (None: a shared subtree, kept whole)."""
    pick = lambda a, sub: sub if a is None else jax.tree.map(lambda x: x[k], sub)  # noqa: E731
    return jax.tree.map(pick, axes, tree, is_leaf=lambda a: a is None)


def keep_rank(rank_mask: PyTree) -> optax.GradientTransformation:
    """Zero the updates of the LoRA padding (outside a member's own rank), so it stays exactly 0.

    `rank_mask` is one member's ({"A": (R, 1), "B": (1, R)} bool per adapter); the updates are a
    trainable partition's, ``{"lora": ..., "params": ...}`` (its adapters' other leaves pass as they are).
    """
    masks = flatten_adapters(rank_mask)

    def update(updates, state, params=None):
        del params
        kept = {
            path: {**u, **{n: jnp.where(masks[path][n], u[n], jnp.zeros_like(u[n])) for n in ("A", "B")}}
            for path, u in flatten_adapters(updates["lora"]).items()
        }
        return {**updates, "lora": unflatten_adapters(kept)}, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def member_optimizer(
    cfg: OptimConfig, trainable: PyTree, lr: jax.Array, loraplus_ratio: jax.Array | None, rank_mask: PyTree
) -> optax.GradientTransformation:
    """One member's optimizer, inside the vmap: `make_optimizer` at its own learning rate and LoRA+
    ratio (traced values), then `keep_rank`."""
    return optax.chain(make_optimizer(cfg, trainable, lr=lr, loraplus_ratio=loraplus_ratio), keep_rank(rank_mask))


def _hyper(pop: Population) -> tuple:
    return pop.lr, pop.loraplus_ratio, pop.rank_mask


def init_population(variables: Mapping, mask: Mapping, cfg: OptimConfig, pop: Population) -> TrainState:
    """Step 0 of a population: `stack_variables`' variables partitioned by `mask`, with every member's
    optimizer state.

    The trained base leaves `mask` selects get a copy per member; the frozen base stays one tree.
    """
    trainable, frozen = partition(variables, mask)
    stack = lambda x: jnp.array(jnp.broadcast_to(x, (pop.size, *x.shape)))  # noqa: E731 (own buffers: donated)
    trainable = {c: jax.tree.map(jnp.copy if c in STACKED else stack, t) for c, t in trainable.items()}

    def init(trainable, lr, ratio, rank_mask):
        return member_optimizer(cfg, trainable, lr, ratio, rank_mask).init(trainable)

    opt_state = jax.vmap(init)(trainable, *_hyper(pop))
    return TrainState(jnp.zeros((), jnp.int32), trainable, frozen, opt_state)


def member_keys(seeds: Sequence[int]) -> jax.Array:
    """(K,) PRNG keys ``key(seed)``, one per member: a population step's dropout keys."""
    return jnp.stack([jax.random.key(s) for s in seeds])


def vmap_members(fn: Callable, cfg: OptimConfig, pop: Population) -> Callable:
    """``fn`` for every member at once: its optimizer and schedule built per member inside one `jax.vmap`.

    ``fn(optimizer, schedule, trainable, opt_state, frozen, mapped, shared) -> outputs`` is one
    member's update (`member_optimizer`, its learning rate schedule). The result is called as
    ``f(trainable, opt_state, frozen, mapped, shared)`` with the stacked trainable partition and
    optimizer state, the population's frozen partition (its base shared, its adapters' scales
    stacked), `mapped` values with a member axis (dropout keys, say) and `shared` ones without
    (a batch: the same for all); every output gets a member axis.
    """
    hyper = _hyper(pop)

    def member(trainable, opt_state, frozen, mapped, shared, lr, ratio, rank_mask):
        optimizer = member_optimizer(cfg, trainable, lr, ratio, rank_mask)
        return fn(optimizer, learning_rate(cfg, lr), trainable, opt_state, frozen, mapped, shared)

    def members(trainable, opt_state, frozen, mapped=(), shared=()):
        frozen_axes = {c: (0 if c in STACKED else None) for c in frozen}
        in_axes = (0, 0, frozen_axes, 0, None, 0, 0, 0)
        return jax.vmap(member, in_axes=in_axes)(trainable, opt_state, frozen, mapped, shared, *hyper)

    return members


def make_population_step(
    model,
    cfg: OptimConfig,
    pop: Population,
    *,
    grad_accum: int | None = None,
    n_devices: int | None = None,
    fsdp: int = 1,
    placement: Placement | None = None,
    dropout: bool = True,
) -> TrainStep:
    """The population's compiled step: `train_step` vmapped over the members, jit over a device mesh as the
    solo step is (`jlora.core.update.mesh`), the members spread over its "member" axis.

    Called as ``step(state, batch, keys) -> (state, metrics)`` with `state` from `init_population`,
    the one batch every member reads, and (K,) dropout keys (`member_keys`); each metric comes back
    (K,), one per member. Member k's losses and adapters are those of a solo `make_train_step` run
    with its settings and dropout key ``keys[k]``.

    On several devices the step is one program over the mesh (GSPMD): each member's leaves live on its
    devices of the "member" axis (gcd(K, n / fsdp) of them), the batch rows are split over "data" and
    "fsdp", the shared base over "fsdp", and no gradient is summed across members. It computes what the
    one-device step computes (dropout masks included), so the losses equal one device's to float
    rounding; ``step.place`` puts a host state on the mesh.

    Args:
      model: the `GPT2` (its LoraConfig's targets and dropout; the scalings are the population's).
      cfg: the optimizer settings every member shares (its lr and LoRA+ ratio are the members').
      pop: from `population`.
      grad_accum, n_devices, fsdp, dropout: as `make_train_step`.
      placement: the mesh (`mesh_placement(pop.size, ...)`), in place of `n_devices` and `fsdp`.
    """
    if placement is None:
        placement = mesh_placement(pop.size, fsdp=fsdp, devices=n_devices)
    grad_accum = grad_accum or cfg.grad_accum
    settings = dict(
        grad_accum=grad_accum, rows=split_rows(placement), dropout=dropout, label_smoothing=cfg.label_smoothing
    )

    def member_step(optimizer, schedule, trainable, opt_state, frozen, rng, shared):
        step, batch = shared
        state = TrainState(step, trainable, frozen, opt_state)
        state, metrics = train_step(model, optimizer, schedule, state, batch, rng, **settings)
        return state.trainable, state.opt_state, metrics

    members = vmap_members(member_step, cfg, pop)

    def update(step, trainable, opt_state, frozen, batch, rng):
        trainable, opt_state, metrics = members(trainable, opt_state, frozen, rng, (step, batch))
        return (step + 1, trainable, opt_state), metrics

    return compile_update(update, placement, stacked=True)


def make_population_eval_step(
    model, mask: Mapping, *, n_devices: int | None = None, fsdp: int = 1, placement: Placement | None = None
) -> EvalStep:
    """``eval_step(state, batch) -> (loss sums (K,), token counts (K,))``: `make_eval_step` per member.

    `mask` is the trainable mask the state was made with (`member_axes`); the step is jit-compiled over
    the mesh as `make_population_step`'s: give it the train step's `placement` (``step.placement``), whose
    member axis the state is placed on (`n_devices` and `fsdp` make a mesh of one member a device group).
    """
    if placement is None:
        placement = mesh_placement(1, fsdp=fsdp, devices=n_devices)
    axes = member_axes(mask)
    sums = jax.vmap(lambda variables, batch: loss_sums(model, variables, batch), in_axes=(axes, None))
    return compile_eval(sums, placement, lambda variables: placement.tree_shardings(variables, axes))
