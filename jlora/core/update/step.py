"""The train step, ``(state, batch, rng) -> (state, metrics)``: pure, then jit-compiled or pmapped.

One update, with k = ``grad_accum`` micro-batches of m rows on each of n devices::

    batch (k*m, T) ─reshape─> (k, m, T) ─scan─> Σ ∇ Σ mask*CE, Σ mask*CE, Σ mask   (∇ w.r.t. trainable)
                                                   │ pmap: psum over the "batch" axis
                             grads = Σ∇ / Σ mask ──┴─> optimizer ─> trainable', opt_state'

A batch may be a shaped one (`jlora.training.data.batching`: trimmed or packed, ``loss_index`` listing
the positions that carry loss); the compiled step is specialised to its shapes, so it compiles
once per distinct (rows, length, loss capacity), which a run keeps to a few.

Sums are added over micro-batches and devices and divided once by the global token count, so
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
from jlora.core.update.optim import OptimConfig, combine, learning_rate, make_optimizer, partition, trainable_mask
from jlora.core.update.parallel import AXIS, local_devices

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
    """A compiled train step and what a loop needs to know to feed it.

    Call it as ``step(state, batch, rng) -> (state, metrics)``. `compiled` is the jitted (or
    pmapped) function of ``(step, trainable, opt_state, frozen, batch, rng)``, for ``.lower()``
    and cost analysis; when `pmapped`, state, batch and metrics carry a leading device axis.
    `place`, when set, puts a host state where the step reads it (a population's members spread
    over a device mesh, `jlora.core.update.population`); the batch it places itself.
    """

    update: Callable[[TrainState, Mapping, jax.Array], tuple[TrainState, dict]]
    compiled: Callable
    n_devices: int
    pmapped: bool
    place: Callable[[TrainState], TrainState] | None = None

    def __call__(self, state: TrainState, batch: Mapping, rng: jax.Array) -> tuple[TrainState, dict]:
        return self.update(state, batch, rng)


class EvalStep(NamedTuple):
    """A compiled evaluation step: ``eval_step(variables_or_state, batch) -> (loss sum, token count)``."""

    evaluate: Callable[[Any, Mapping], tuple[jax.Array, jax.Array]]
    n_devices: int
    pmapped: bool

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
    model, variables: PyTree, cfg: OptimConfig, mask: PyTree | None = None, *, n_devices: int | None = None
) -> tuple[TrainState, TrainStep]:
    """Step 0 and the compiled step of training the leaves of `variables` that `mask` selects.

    `mask` defaults to ``trainable_mask(variables)`` (the adapters); the optimizer is
    ``make_optimizer(cfg, trainable partition)``, so `init_state` and `make_train_step` share it.
    """
    mask = trainable_mask(variables) if mask is None else mask
    optimizer = make_optimizer(cfg, partition(variables, mask)[0])
    return init_state(variables, mask, optimizer), make_train_step(model, optimizer, cfg, n_devices=n_devices)


def gradients(
    model,
    trainable: PyTree,
    frozen: PyTree,
    batch: Mapping[str, jax.Array],
    rng: jax.Array | None,
    *,
    grad_accum: int = 1,
    axis_name: str | None = None,
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
      axis_name: the pmap axis to sum over, when called inside `jax.pmap`.
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
        rows = batch["input_ids"].shape[0]
        if rows % grad_accum:
            raise ValueError(f"a batch of {rows} rows does not split into grad_accum={grad_accum} micro-batches")
        micro_batches = jax.tree.map(lambda x: x.reshape(grad_accum, rows // grad_accum, *x.shape[1:]), batch)

        def add(carry, xs):
            i, micro_batch = xs
            (s, n), g = grad_of_sum(trainable, micro_batch, key(i))
            g_sum, s_sum, n_sum = carry
            return (jax.tree.map(jnp.add, g_sum, g), s_sum + s, n_sum + n), None

        zero = jnp.zeros((), jnp.float32)
        init = (jax.tree.map(jnp.zeros_like, trainable), zero, zero)
        (grad_sum, loss_sum, tokens), _ = jax.lax.scan(add, init, (jnp.arange(grad_accum), micro_batches))

    if axis_name is not None:
        grad_sum, loss_sum, tokens = jax.lax.psum((grad_sum, loss_sum, tokens), axis_name)
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
    axis_name: str | None = None,
    dropout: bool = True,
    label_smoothing: float = 0.0,
) -> tuple[TrainState, dict]:
    """One optimizer update on a global batch: the pure function `make_train_step` compiles.

    The dropout key is ``rng`` folded with the step number (and the device index under pmap),
    so a loop may pass the same key at every step. `schedule` only reports the learning rate
    (None: no ``lr`` metric).

    Returns:
      (state after the update, metrics): ``loss`` (mean over the batch's loss tokens, before
      the update), ``tokens`` (their number), ``grad_norm`` (global norm before clipping),
      ``lr`` (this update's base learning rate).
    """
    key = None
    if dropout:
        key = jax.random.fold_in(rng, state.step)
        if axis_name is not None:
            key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    smoothing = dict(label_smoothing=label_smoothing)
    grads, loss_sum, tokens = gradients(
        model, state.trainable, state.frozen, batch, key, grad_accum=grad_accum, axis_name=axis_name, **smoothing
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
    dropout: bool = True,
) -> TrainStep:
    """`train_step` compiled: jit on one device, pmap over `n_devices` local devices otherwise.

    Under a multi-host launch (`jlora.initialize_distributed`) the step is pmapped even with one
    local device, and its psum spans every process's devices.

    Args:
      model: a `jlora.GPT2` (its config chooses dtype and remat).
      optimizer: from `make_optimizer(cfg, ...)`.
      cfg: the `OptimConfig` the optimizer was made from: its grad_accum, and its schedule for
        the ``lr`` metric (None: no ``lr`` metric, grad_accum from the argument or 1).
      grad_accum: overrides ``cfg.grad_accum``.
      n_devices: local devices to use (None: all of them).
      dropout: train with the model's dropout (False: deterministic forward).

    Returns:
      A `TrainStep`, called as ``step(state, batch, rng) -> (state, metrics)``. The input
      state's step, trainable and optimizer state are donated (do not reuse them); its frozen
      partition is passed through. When ``step.pmapped``, `state` must be `replicate`d, `batch`
      (this process's rows) `shard_batch`ed to (n, rows, T), and the metrics come back per
      device (`unreplicate` them); `rng` is shared.
    """
    schedule = None if cfg is None else learning_rate(cfg)
    grad_accum = grad_accum or (1 if cfg is None else cfg.grad_accum)
    devices = local_devices(n_devices)
    axis_name = parallel_axis(devices)

    settings = dict(grad_accum=grad_accum, axis_name=axis_name, dropout=dropout)
    settings["label_smoothing"] = 0.0 if cfg is None else cfg.label_smoothing

    def update(step, trainable, opt_state, frozen, batch, rng):
        state = TrainState(step, trainable, frozen, opt_state)
        state, metrics = train_step(model, optimizer, schedule, state, batch, rng, **settings)
        return (state.step, state.trainable, state.opt_state), metrics

    return compile_update(update, devices)


def compile_update(update: Callable, devices: list) -> TrainStep:
    """A `TrainStep` of ``update(step, trainable, opt_state, frozen, batch, rng) -> ((step, trainable,
    opt_state), metrics)``: jit on one device, pmap (axis `AXIS`, `rng` shared) over several.

    `update` must reduce over `AXIS` itself when pmapped (``len(devices) > 1`` or several processes).
    """
    if not _parallel(devices):
        compiled = jax.jit(update, donate_argnums=(0, 1, 2))
    else:
        compiled = jax.pmap(
            update, AXIS, in_axes=(0, 0, 0, 0, 0, None), donate_argnums=(0, 1, 2), devices=_pmap_devices(devices)
        )

    def step(state: TrainState, batch: Mapping, rng: jax.Array) -> tuple[TrainState, dict]:
        (n, trainable, opt_state), metrics = compiled(
            state.step, state.trainable, state.opt_state, state.frozen, step_inputs(batch), rng
        )
        return TrainState(n, trainable, state.frozen, opt_state), metrics

    return TrainStep(step, compiled, len(devices), _parallel(devices))


def parallel_axis(devices: list) -> str | None:
    """The axis name a step's collectives reduce over on `devices` (None: one device, plain jit)."""
    return AXIS if _parallel(devices) else None


def _parallel(devices: list) -> bool:
    """pmap when there are several local devices, or several processes (even of one device each)."""
    return len(devices) > 1 or jax.process_count() > 1


def _pmap_devices(devices: list) -> list | None:
    """None (pmap's default: every device of every process) when all local devices take part;
    an explicit list only for a subset, which is a single-host setting."""
    return None if len(devices) == jax.local_device_count() else devices


def make_eval_step(model, *, n_devices: int | None = None) -> EvalStep:
    """``eval_step(variables_or_state, batch) -> (masked loss sum, token count)``, deterministic.

    jit on one device, pmap (summed over devices, `replicate`d variables, `shard_batch`ed
    batch) on several. Divide the sums over a whole evaluation set for its mean loss.
    """
    return compile_eval(lambda variables, batch: loss_sums(model, variables, batch), local_devices(n_devices))


def compile_eval(sums: Callable, devices: list) -> EvalStep:
    """An `EvalStep` of ``sums(variables, batch) -> sums``: jit, or pmap with the sums added over devices.

    The step reads a state's ``.variables`` (or the variables themselves) and the batch's `BATCH_KEYS`.
    """
    axis_name = parallel_axis(devices)

    def evaluate(variables, batch):
        out = sums(variables, batch)
        return out if axis_name is None else jax.lax.psum(out, axis_name)

    compiled = jax.jit(evaluate) if axis_name is None else jax.pmap(evaluate, AXIS, devices=_pmap_devices(devices))

    def eval_step(variables_or_state, batch: Mapping) -> tuple[jax.Array, jax.Array]:
        variables = getattr(variables_or_state, "variables", variables_or_state)
        return compiled(variables, step_inputs(batch))

    return EvalStep(eval_step, len(devices), axis_name is not None)
