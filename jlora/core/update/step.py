"""The train step, ``(state, batch, rng) -> (state, metrics)``: pure, then jit-compiled over a device mesh.

One update, with k = ``grad_accum`` micro-batches of m rows::

    batch (k*m, T) ─reshape─> (k, m, T) ─scan─> Σ ∇ Σ mask*CE, Σ mask*CE, Σ mask   (∇ w.r.t. trainable)
                             grads = Σ∇ / Σ mask ──> optimizer ─> trainable', opt_state'

The step is written for the whole batch on one device; `jax.jit` over a `Placement`'s mesh
(`jlora.core.update.mesh`) splits it: the batch's rows over the devices, the frozen base's weights
over the "fsdp" axis, and XLA adds the sums over devices (GSPMD). Every device draws the same
dropout masks as one device would for the whole batch, so a step on n devices computes what the
one-device step computes, to float rounding.

A batch may be a shaped one (`jlora.training.data.batching`: trimmed or packed, ``loss_index`` listing
the positions that carry loss); the compiled step is specialised to its shapes, so it compiles
once per distinct (rows, length, loss capacity), which a run keeps to a few.

Sums are added over micro-batches and rows and divided once by the global token count, so
the update is the one big batch's, however the batch is split. Only the trainable partition is
differentiated; the frozen one enters the loss as a constant, so no gradient of a frozen weight
is ever formed, and it is handed back untouched (not donated, not copied: after any number of
steps it is the very arrays it was at the start).

>>> import jax, jax.numpy as jnp, numpy as np, jlora
>>> config = jlora.GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2)
>>> model = jlora.GPT2(config, jlora.LoraConfig(r=2, alpha=4))
>>> params = jlora.init_params(jax.random.key(0), config)
>>> variables = {"params": params, "lora": jlora.init_lora(jax.random.key(1), model, params)}
>>> mask = jlora.trainable_mask(variables)
>>> cfg = jlora.OptimConfig(lr=1e-2)
>>> optimizer = jlora.make_optimizer(cfg, jlora.partition(variables, mask)[0])
>>> state = jlora.init_state(variables, mask, optimizer)
>>> step = jlora.make_train_step(model, optimizer, cfg, n_devices=1)
>>> state, step = jlora.init_training(model, variables, cfg, n_devices=1)  # the four lines above in one
>>> ids = np.arange(8, dtype=np.int32)[None] % 11
>>> batch = {"input_ids": ids, "targets": (ids + 1) % 11, "loss_mask": np.ones((1, 8), np.float32)}
>>> state, metrics = step(state, batch, jax.random.key(2))
>>> int(state.step), float(metrics["tokens"]), sorted(metrics)
(1, 8.0, ['grad_norm', 'loss', 'lr', 'tokens'])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jlora.core.update.loss import loss_sums
from jlora.core.update.mesh import Placement, mesh_placement, put
from jlora.core.update.optim import OptimConfig, combine, learning_rate, make_optimizer, partition, trainable_mask

PyTree = Any
BATCH_KEYS = ("input_ids", "targets", "loss_mask")  # what the step reads; the attention mask is left out
# shaped batches' (`jlora.core.update.loss`), and a mixed-adapter batch's row -> adapter (`jlora.core.algebra.mixed`)
OPTIONAL_KEYS = ("loss_index", "segment_ids", "position_ids", "adapter_index")


def step_inputs(batch: Mapping) -> dict:
    """The arrays of a batch the step reads (`BATCH_KEYS`, and `OPTIONAL_KEYS` it has); the attention mask
    and the rest are left out."""
    return {k: batch[k] for k in BATCH_KEYS + OPTIONAL_KEYS if k in batch or k in BATCH_KEYS}


class TrainState(struct.PyTreeNode):
    """Everything an update reads and writes.

    Attributes:
      step: int32 scalar, updates done so far (the learning-rate schedule's argument).
      trainable: the variables' trainable partition (LoRA leaves and chosen base leaves).
      frozen: the rest of the variables (None where `trainable` has a leaf).
      opt_state: the optimizer's state, which mirrors `trainable`.
    """

    step: jax.Array
    trainable: PyTree
    frozen: PyTree
    opt_state: optax.OptState

    @property
    def variables(self) -> PyTree:
        """The model's variables, ``combine(trainable, frozen)``."""
        return combine(self.trainable, self.frozen)


class TrainStep(NamedTuple):
    """A compiled train step and where it runs.

    Call it as ``step(state, batch, rng) -> (state, metrics)``; a host batch (numpy) is placed on the
    mesh at each call, and a state should be placed once first (`place`; a host state also works, but
    its frozen base is then sent to the devices at every step). `compiled` is the jitted function of
    ``(step, trainable, opt_state, frozen, batch, rng)``, for ``.lower()`` and cost analysis.
    """

    update: Callable[[TrainState, Mapping, jax.Array], tuple[TrainState, dict]]
    compiled: Any
    placement: Placement
    stacked: bool = False  # a population's: the trainable leaves and optimizer state carry a member axis

    def __call__(self, state: TrainState, batch: Mapping, rng: jax.Array) -> tuple[TrainState, dict]:
        return self.update(state, batch, rng)

    def place(self, state: TrainState) -> TrainState:
        """`state` on the step's mesh (`Placement.place`): what the step reads and hands back."""
        return self.placement.place(state, stacked=self.stacked)


class EvalStep(NamedTuple):
    """A compiled evaluation step: ``eval_step(variables_or_state, batch) -> (loss sum, token count)``.

    Like `TrainStep`, it places a host batch itself; the sums come back on the devices (`fetch` them).
    """

    evaluate: Callable[[Any, Mapping], tuple[jax.Array, jax.Array]]
    placement: Placement

    def __call__(self, variables_or_state: Any, batch: Mapping) -> tuple[jax.Array, jax.Array]:
        return self.evaluate(variables_or_state, batch)


def init_state(variables: PyTree, mask: PyTree, optimizer: optax.GradientTransformation) -> TrainState:
    """Step 0: `variables` partitioned by `mask`, and the optimizer's state for the trainable part.

    The trainable leaves are copied (the step donates them; `variables` stays usable), the
    frozen ones are not (the step only reads them).
    """
    trainable, frozen = partition(variables, mask)
    trainable = jax.tree.map(jnp.copy, trainable)
    return TrainState(jnp.zeros((), jnp.int32), trainable, frozen, optimizer.init(trainable))


def init_training(
    model,
    variables: PyTree,
    cfg: OptimConfig,
    mask: PyTree | None = None,
    *,
    n_devices: int | None = None,
    placement: Placement | None = None,
) -> tuple[TrainState, TrainStep]:
    """Step 0 and the compiled step of training the leaves of `variables` that `mask` selects.

    `mask` defaults to ``trainable_mask(variables)`` (the adapters); the optimizer is
    ``make_optimizer(cfg, trainable partition)``, so `init_state` and `make_train_step` share it.
    """
    mask = trainable_mask(variables) if mask is None else mask
    optimizer = make_optimizer(cfg, partition(variables, mask)[0])
    step = make_train_step(model, optimizer, cfg, n_devices=n_devices, placement=placement)
    return init_state(variables, mask, optimizer), step


def gradients(
    model,
    trainable: PyTree,
    frozen: PyTree,
    batch: Mapping[str, jax.Array],
    rng: jax.Array | None,
    *,
    grad_accum: int = 1,
    rows: jax.sharding.NamedSharding | None = None,
    label_smoothing: float = 0.0,
) -> tuple[PyTree, jax.Array, jax.Array]:
    """(grads, loss sum, token count) of the global batch; grads of the mean masked loss.

    Args:
      model: a `jlora.GPT2`.
      trainable, frozen: the two partitions of the variables; only `trainable` is differentiated.
      batch: ``input_ids``, ``targets``, ``loss_mask`` of shape (grad_accum * m, T), and the optional
        ``loss_index``, ``segment_ids``, ``position_ids`` of a shaped batch (`jlora.core.update.loss`).
      rng: dropout key (None: no dropout); micro-batch i uses ``fold_in(rng, i)``.
      grad_accum: k, the number of micro-batches the rows are split into (consecutive rows).
      rows: the sharding of the batch's rows (`Placement.rows`) when they are split over devices: each
        micro-batch keeps its rows split the same way, so that every device computes its share of every
        micro-batch (None: one device, or left to XLA).
      label_smoothing: of the loss (`jlora.core.update.loss.loss_sums`); 0: plain cross-entropy.
    Returns:
      grads (like `trainable`), and the loss sum and token count over the global batch.
    """

    def sums(params, micro_batch, key):
        return loss_sums(model, combine(params, frozen), micro_batch, key, label_smoothing=label_smoothing)

    grad_of_sum = jax.value_and_grad(sums, has_aux=True)
    batch = step_inputs(batch)
    key = lambda i: None if rng is None else jax.random.fold_in(rng, i)  # noqa: E731

    if grad_accum == 1:
        (loss_sum, tokens), grad_sum = grad_of_sum(trainable, batch, key(0))
    else:
        n_rows = batch["input_ids"].shape[0]
        if n_rows % grad_accum:
            raise ValueError(f"a batch of {n_rows} rows does not split into grad_accum={grad_accum} micro-batches")
        micro_batches = jax.tree.map(lambda x: x.reshape(grad_accum, n_rows // grad_accum, *x.shape[1:]), batch)
        if rows is not None:
            split = jax.sharding.NamedSharding(rows.mesh, jax.sharding.PartitionSpec(None, *rows.spec))
            micro_batches = jax.lax.with_sharding_constraint(micro_batches, split)

        def add(carry, xs):
            i, micro_batch = xs
            (s, n), g = grad_of_sum(trainable, micro_batch, key(i))
            g_sum, s_sum, n_sum = carry
            return (jax.tree.map(jnp.add, g_sum, g), s_sum + s, n_sum + n), None

        zero = jnp.zeros((), jnp.float32)
        init = (jax.tree.map(jnp.zeros_like, trainable), zero, zero)
        (grad_sum, loss_sum, tokens), _ = jax.lax.scan(add, init, (jnp.arange(grad_accum), micro_batches))

    denominator = jnp.maximum(tokens, 1.0)  # a batch with no loss tokens updates nothing, rather than NaN
    return jax.tree.map(lambda g: g / denominator, grad_sum), loss_sum, tokens


def train_step(
    model,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule | None,
    state: TrainState,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    *,
    grad_accum: int = 1,
    rows: jax.sharding.NamedSharding | None = None,
    dropout: bool = True,
    label_smoothing: float = 0.0,
) -> tuple[TrainState, dict]:
    """One optimizer update on a global batch: the pure function `make_train_step` compiles.

    The dropout key is ``rng`` folded with the step number, so a loop may pass the same key at
    every step; it is one key for the whole batch, however its rows are split over devices.
    `schedule` only reports the learning rate (None: no ``lr`` metric); `rows` is `gradients`'.

    Returns:
      (state after the update, metrics): ``loss`` (mean over the batch's loss tokens, before
      the update), ``tokens`` (their number), ``grad_norm`` (global norm before clipping),
      ``lr`` (this update's base learning rate).
    """
    key = jax.random.fold_in(rng, state.step) if dropout else None
    smoothing = dict(label_smoothing=label_smoothing)
    grads, loss_sum, tokens = gradients(
        model, state.trainable, state.frozen, batch, key, grad_accum=grad_accum, rows=rows, **smoothing
    )
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {
        "loss": loss_sum / jnp.maximum(tokens, 1.0),
        "tokens": tokens,
        "grad_norm": optax.tree.norm(grads),
    }
    if schedule is not None:
        metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics


def make_train_step(
    model,
    optimizer: optax.GradientTransformation,
    cfg: OptimConfig | None = None,
    *,
    grad_accum: int | None = None,
    n_devices: int | None = None,
    fsdp: int = 1,
    placement: Placement | None = None,
    dropout: bool = True,
) -> TrainStep:
    """`train_step` compiled: `jax.jit` over a device mesh (`jlora.core.update.mesh`).

    Args:
      model: a `jlora.GPT2` (its config chooses dtype and remat).
      optimizer: from `make_optimizer(cfg, ...)`.
      cfg: the `OptimConfig` the optimizer was made from: its grad_accum, and its schedule for
        the ``lr`` metric (None: no ``lr`` metric, grad_accum from the argument or 1).
      grad_accum: overrides ``cfg.grad_accum``.
      n_devices: a mesh over this process's first `n_devices` devices (None: every device, every
        process's under a multi-host launch, `jlora.initialize_distributed`).
      fsdp: the frozen base's weights split over this many devices (the mesh's "fsdp" axis).
      placement: the mesh itself (`mesh_placement`), in place of `n_devices` and `fsdp`.
      dropout: train with the model's dropout (False: deterministic forward).

    Returns:
      A `TrainStep`, called as ``step(state, batch, rng) -> (state, metrics)`` with the global batch
      (host arrays, placed by the step) and one `rng` for all devices. The input state's step,
      trainable and optimizer state are donated (do not reuse them); its frozen partition is
      passed through. ``step.place(state)`` puts a state on the mesh once, before the first step.
    """
    if placement is None:
        placement = mesh_placement(1, fsdp=fsdp, devices=n_devices)
    schedule = None if cfg is None else learning_rate(cfg)
    grad_accum = grad_accum or (1 if cfg is None else cfg.grad_accum)
    settings = dict(grad_accum=grad_accum, rows=split_rows(placement), dropout=dropout)
    settings["label_smoothing"] = 0.0 if cfg is None else cfg.label_smoothing

    def update(step, trainable, opt_state, frozen, batch, rng):
        state = TrainState(step, trainable, frozen, opt_state)
        state, metrics = train_step(model, optimizer, schedule, state, batch, rng, **settings)
        return (state.step, state.trainable, state.opt_state), metrics

    return compile_update(update, placement)


def split_rows(placement: Placement) -> jax.sharding.NamedSharding | None:
    """`gradients`' `rows`: the placement's row sharding when a batch is split over several devices."""
    return placement.rows if placement.row_devices > 1 else None


def compile_update(update: Callable, placement: Placement, *, stacked: bool = False) -> TrainStep:
    """A `TrainStep` of ``update(step, trainable, opt_state, frozen, batch, rng) -> ((step, trainable,
    opt_state), metrics)``, jit-compiled over `placement`'s mesh.

    The state's shardings are `Placement.state_shardings` (`stacked`: a population's, by member), the
    batch's rows are split (`Placement.rows`), `rng` and the metrics are by member (whole for one adapter).
    They are read from the first call's state, once for each structure of the arguments.
    """
    cache = {}

    def jitted(step, trainable, opt_state, frozen, batch) -> tuple[Callable, TrainState]:
        """The jitted update for arguments of this structure, and the state's shardings."""
        key = jax.tree.structure((trainable, opt_state, frozen, batch))  # one model: its shapes stay
        if key not in cache:
            s = placement.state_shardings(TrainState(step, trainable, frozen, opt_state), stacked=stacked)
            compiled = jax.jit(
                update,
                in_shardings=(s.step, s.trainable, s.opt_state, s.frozen, placement.rows, placement.members),
                out_shardings=((s.step, s.trainable, s.opt_state), placement.members),
                donate_argnums=(0, 1, 2),
            )
            cache[key] = compiled, s
        return cache[key]

    class Compiled:  # `TrainStep.compiled`: .lower() and ._cache_size() like a jitted function's
        @staticmethod
        def lower(step, trainable, opt_state, frozen, batch, rng):
            args = (step, trainable, opt_state, frozen, batch)
            return jitted(*args)[0].lower(*args, rng)

        @staticmethod
        def _cache_size() -> int:  # programs compiled (one per shape of the batch)
            return sum(f._cache_size() for f, _ in cache.values())

    def train(state: TrainState, batch: Mapping, rng: jax.Array) -> tuple[TrainState, dict]:
        batch, rng = host_inputs(placement, step_inputs(batch), rng)
        compiled, s = jitted(state.step, state.trainable, state.opt_state, state.frozen, batch)
        if getattr(state.step, "sharding", None) != s.step:  # a host state: what the step updates is placed as
            # the step hands it back (the mesh is part of the traced type: one program then serves every call)
            state = state.replace(step=put(state.step, s.step), trainable=put(state.trainable, s.trainable))
            state = state.replace(opt_state=put(state.opt_state, s.opt_state))
        (n, trainable, opt_state), metrics = compiled(
            state.step, state.trainable, state.opt_state, state.frozen, batch, rng
        )
        return TrainState(n, trainable, state.frozen, opt_state), metrics

    return TrainStep(train, Compiled(), placement, stacked)


def host_inputs(placement: Placement, batch: Mapping, rng: jax.Array | None = None) -> tuple[Mapping, jax.Array]:
    """A step's batch and key as its jitted function takes them. In one process host arrays go in as they are
    (the jit's in_shardings place them, without a Python call per leaf); in several, each process gives the
    rows its devices hold (`Placement.place_batch`) and the key becomes one array over all of them."""
    if jax.process_count() == 1:
        return batch, rng
    return placement.place_batch(batch), None if rng is None else put(rng, placement.members)


def make_eval_step(
    model, *, n_devices: int | None = None, fsdp: int = 1, placement: Placement | None = None
) -> EvalStep:
    """``eval_step(variables_or_state, batch) -> (masked loss sum, token count)``, deterministic.

    jit over a mesh as `make_train_step`'s (the same `n_devices`, `fsdp` or `placement`); the batch's
    rows are split over the devices and the sums added over them. Divide the sums over a whole
    evaluation set for its mean loss.
    """
    if placement is None:
        placement = mesh_placement(1, fsdp=fsdp, devices=n_devices)
    return compile_eval(lambda variables, batch: loss_sums(model, variables, batch), placement)


def compile_eval(sums: Callable, placement: Placement, shardings: Callable[[Any], Any] | None = None) -> EvalStep:
    """An `EvalStep` of ``sums(variables, batch) -> sums``, jit-compiled over `placement`'s mesh.

    The step reads a state's ``.variables`` (or the variables themselves), placed by `shardings`
    (``variables -> their shardings``; default `Placement.tree_shardings`: the base split over
    "fsdp", adapters whole), and the batch's `BATCH_KEYS`, its rows split. The sums come back by
    member (whole for one adapter).
    """
    shardings = shardings or placement.tree_shardings
    cache = {}

    def eval_step(variables_or_state, batch: Mapping) -> tuple[jax.Array, jax.Array]:
        variables = getattr(variables_or_state, "variables", variables_or_state)
        batch, _ = host_inputs(placement, step_inputs(batch))
        key = jax.tree.structure((variables, batch))
        if key not in cache:
            placed = shardings(variables)
            compiled = jax.jit(sums, in_shardings=(placed, placement.rows), out_shardings=placement.members)
            cache[key] = compiled, placed
        compiled, placed = cache[key]
        return compiled(put(variables, placed), batch)  # placed: host and placed variables share a program

    return EvalStep(eval_step, placement)
