"""A known low-rank update planted in a model, and its recovery by LoRA students.

    teacher_params, planted = plant_low_rank(key, params, LoraConfig(r=k, alpha=k), scale)  # W + U diag(s) V^T
    loras, losses = distill_students(base, params, teacher_params, [LoraConfig(r=r, alpha=2 * r) for r in ranks],
                                     key, optim, batch_size=16, seq_len=32)   # one population: KL(teacher || student)
    distill_gap(base, teacher_params, merge(params, lora), key)      # held-out KL; 0: the teacher
    compare_to_planted(lora, planted)                                    # phi(k, k) on both sides of dW
    teacher_rows(key, base, teacher_params, n=10_000, seq_len=32)       # a training set of any size, sampled

The student sees no text: its inputs are uniformly random tokens and its target the teacher's
whole next-token distribution at every position, a far denser signal than sampled text, so
what limits recovery is the student's rank, not the data. The students of every rank train at
once, as one population on the one base (`jlora.core.update.population`), each as it would alone.

`teacher_rows` makes the opposite kind of data, for experiments where the amount of it is the
question: each row's targets are single tokens drawn from the teacher's distributions, so a row
carries little information and a student can overfit a few. A random GPT-2's next-token
distributions are nearly uniform (logits of about 0.1), which hides any planted change in such
samples; `sharpen` multiplies ln_f's scale, and so every logit, as a trained model's are larger.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlora.core.analysis.divergence import kl_divergence
from jlora.core.lora.adapter import (
    SCALE,
    flatten_adapters,
    init_lora,
    output_columns,
    scaling_of,
    split_slice,
    unflatten_adapters,
)
from jlora.core.lora.config import LoraConfig
from jlora.core.lora.merge import merge
from jlora.core.lora.svd import delta_svd, factored_svd, subspace_similarity_grid
from jlora.core.models.gpt2 import GPT2
from jlora.core.update.optim import OptimConfig, combine, trainable_mask
from jlora.core.update.population import (
    Member,
    Population,
    init_population,
    member_lora,
    population,
    stack_variables,
    vmap_members,
)
from jlora.core.update.step import TrainState
from jlora.errors import ConfigError
from jlora.training.data.rows import TokenizedData
from jlora.tree import get_path, replace_paths

PyTree = Any


SPECTRA = {
    "linear": lambda k: np.linspace(1.0, 0.5, k),  # k directions of about equal weight
    "harmonic": lambda k: 1.0 / np.arange(1, k + 1),  # s_i = s_1 / i: each direction matters less than the last
}


def plant_low_rank(
    key: jax.Array, params: Mapping, cfg: LoraConfig, scale: float, *, spectrum: str = "linear"
) -> tuple[dict, dict]:
    """A teacher: `params` plus a known rank-k update on every module `cfg` targets (k = ``cfg.r``).

    Each planted update is ``dW = U diag(s) V^T`` with U (d_out, k) and V (d_in, k) random
    orthonormal and s from ``scale * ||W||_2`` down: spaced evenly to half of that ("linear"), or
    as 1, 1/2, ..., 1/k of it ("harmonic"). So it is large next to the weight it changes (W's own
    top singular value times `scale`) and its singular directions are ordered.

    A weight fed by a LayerNorm (c_attn by ln_1, c_fc by ln_2) never sees one input direction:
    the normalised input has zero mean, so ``x . (1 / gamma) = beta . (1 / gamma)`` for every
    input. An update along it would only shift the bias, and no student could recover it, so
    V is drawn orthogonal to it.

    Returns:
      (teacher params = ``merge(params, planted)``, the planted adapters, ``scaling * B A = dW`` per
      module with the scale `cfg` gives).
    """
    if spectrum not in SPECTRA:
        raise ConfigError(f"unknown planted spectrum {spectrum!r}; valid: {', '.join(SPECTRA)}")
    flat = {}
    for i, path in enumerate(cfg.module_paths(params)):
        module = split_slice(path)[0]
        kernel = get_path(params, module)["kernel"]
        w = kernel[:, output_columns(path, kernel.shape[1])].T  # (d_out, d_in)
        blind = jnp.zeros(w.shape[1], jnp.float32)
        norm = {"attn.c_attn": "ln_1", "mlp.c_fc": "ln_2"}.get(".".join(module.split(".")[2:]))
        if norm is not None:
            gamma = get_path(params, ".".join(module.split(".")[:2]) + "." + norm)["scale"].astype(jnp.float32)
            blind = jnp.where(gamma != 0, 1.0 / jnp.where(gamma != 0, gamma, 1.0), 0.0)
        k = cfg.rank_for(path)
        s = scale * SPECTRA[spectrum](k)
        scaling = cfg.scaling_for(path, k)
        flat[path] = {
            **_planted(jax.random.fold_in(key, i), w, blind, k, jnp.asarray(s, jnp.float32), scaling),
            SCALE: jnp.asarray(scaling, jnp.float32),
        }
    planted = unflatten_adapters(flat)
    return merge(params, planted), planted


@partial(jax.jit, static_argnums=3)
def _planted(key: jax.Array, w: jax.Array, blind: jax.Array, k: int, profile: jax.Array, scaling: float) -> dict:
    key_u, key_v = jax.random.split(key)
    (d_out, d_in), w = w.shape, w.astype(jnp.float32)
    b = blind / jnp.maximum(jnp.linalg.norm(blind), 1e-30)  # unit, or 0: nothing to avoid
    g = jax.random.normal(key_v, (d_in, k))
    u = jnp.linalg.qr(jax.random.normal(key_u, (d_out, k)))[0]
    v = jnp.linalg.qr(g - jnp.outer(b, b @ g))[0]
    s = jnp.linalg.norm(w, 2) * profile
    root = jnp.sqrt(s / scaling)
    return {"A": root[:, None] * v.T, "B": u * root[None, :]}


def random_tokens(key: jax.Array, batch_size: int, seq_len: int, vocab_size: int) -> jax.Array:
    """(batch_size, seq_len) int32 tokens drawn uniformly: inputs that probe every direction."""
    return jax.random.randint(key, (batch_size, seq_len), 0, vocab_size, jnp.int32)


def sharpen(params: Mapping, factor: float) -> dict:
    """`params` with ln_f's scale times `factor`: every next-token logit `factor` times larger."""
    return replace_paths(params, {"ln_f.scale": params["ln_f"]["scale"] * factor})


@partial(jax.jit, static_argnums=(0, 3, 4))
def _sampled_rows(model: GPT2, teacher_params: PyTree, key: jax.Array, rows: int, seq_len: int):
    ids = random_tokens(jax.random.fold_in(key, 0), rows, seq_len, model.config.vocab_size)
    logits = model.apply({"params": teacher_params}, ids)
    return ids, jax.random.categorical(jax.random.fold_in(key, 1), logits).astype(jnp.int32)


def teacher_rows(
    key: jax.Array, model: GPT2, teacher_params: PyTree, n: int, seq_len: int, *, chunk: int = 512
) -> TokenizedData:
    """`n` training rows: uniformly random tokens as input, and at every position a target token drawn
    from the teacher's next-token distribution there (every position carries loss).

    Rows are made `chunk` at a time, chunk i from ``fold_in(key, i)``, so the first n rows of a
    larger set (made with the same key and chunk) are the set of n rows.
    """
    ids, targets = [], []
    for i in range(-(-n // chunk)):
        a, b = _sampled_rows(model, teacher_params, jax.random.fold_in(key, i), chunk, seq_len)
        ids.append(a)
        targets.append(b)
    ids, targets = (np.concatenate(jax.device_get(x))[:n] for x in (ids, targets))
    ones = np.ones(ids.shape, np.float32)
    return TokenizedData(ids, targets, ones, ones.astype(np.int32), np.arange(n, dtype=np.int32))


def make_distill_step(
    student: GPT2,
    teacher: GPT2,
    optim: OptimConfig,
    pop: Population,
    *,
    batch_size: int,
    seq_len: int,
) -> Callable[[TrainState, PyTree, jax.Array], tuple[TrainState, jax.Array]]:
    """A compiled update of a population of students towards the teacher's next-token distributions.

    ``step(state, teacher_params, key) -> (state, losses (K,))``: the batch is `random_tokens` drawn
    from ``fold_in(key, state.step)``, shared by every student, and the teacher's logits on it are
    computed once for all of them; each student's loss is its mean KL(teacher || student) over the
    batch's positions, differentiated with respect to its own trainable leaves only, and applied by
    its own optimizer (`jlora.core.update.population.vmap_members`).
    """
    vocab_size = teacher.config.vocab_size

    def loss(trainable, frozen, teacher_params, ids):
        target = jax.lax.stop_gradient(teacher.apply({"params": teacher_params}, ids))
        return jnp.mean(kl_divergence(target, student.apply(combine(trainable, frozen), ids)))

    def member(optimizer, schedule, trainable, opt_state, frozen, mapped, shared):
        value, grads = jax.value_and_grad(loss)(trainable, frozen, *shared)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    members = vmap_members(member, optim, pop)

    @partial(jax.jit, donate_argnums=(0, 1, 2))
    def update(step, trainable, opt_state, frozen, teacher_params, key):
        ids = random_tokens(jax.random.fold_in(key, step), batch_size, seq_len, vocab_size)
        trainable, opt_state, values = members(trainable, opt_state, frozen, (), (teacher_params, ids))
        return step + 1, trainable, opt_state, values

    def step(state: TrainState, teacher_params: PyTree, key: jax.Array) -> tuple[TrainState, jax.Array]:
        n, trainable, opt_state, values = update(
            state.step, state.trainable, state.opt_state, state.frozen, teacher_params, key
        )
        return TrainState(n, trainable, state.frozen, opt_state), values

    return step


@partial(jax.jit, static_argnums=0)
def _mean_kl(model: GPT2, teacher_params: PyTree, params: PyTree, ids: jax.Array) -> jax.Array:
    return jnp.mean(kl_divergence(model.apply({"params": teacher_params}, ids), model.apply({"params": params}, ids)))


def distill_gap(
    model: GPT2,
    teacher_params: PyTree,
    params: PyTree,
    key: jax.Array,
    *,
    batches: int = 4,
    batch_size: int = 32,
    seq_len: int = 32,
) -> float:
    """Mean KL(teacher || model) on held-out random tokens: 0 when the model has become the teacher.

    `params` are plain (merged) weights for `model`, the base architecture the teacher shares.
    """
    vocab = model.config.vocab_size
    gaps = [
        _mean_kl(model, teacher_params, params, random_tokens(jax.random.fold_in(key, i), batch_size, seq_len, vocab))
        for i in range(batches)
    ]
    return float(np.mean(jax.device_get(gaps)))


def delta_subspaces(
    adapter_1: Mapping, scaling_1: float, adapter_2: Mapping, scaling_2: float
) -> dict[str, np.ndarray]:
    """phi(i, j) between two updates dW = scaling * B A, on both sides of dW.

    "row": the input (row) spaces, spanned by dW's right singular vectors; "column": the
    output (column) spaces, its left singular vectors. Each is ordered by dW's own singular
    values (not A's or B's), so phi(k, k) asks whether the top-k directions of the two updates
    coincide. Returns {"row": (r1, r2), "column": (r1, r2)} in [0, 1].
    """
    u1, s1, vt1 = factored_svd(adapter_1["A"], adapter_1["B"], scaling_1)
    u2, s2, vt2 = factored_svd(adapter_2["A"], adapter_2["B"], scaling_2)
    # subspace_similarity_grid reads the right singular vectors of its arguments, in order:
    # diag(s) V^T has right singular vectors V^T's rows, ordered by s (likewise diag(s) U^T).
    row = subspace_similarity_grid(s1[:, None] * vt1, s2[:, None] * vt2)
    column = subspace_similarity_grid(s1[:, None] * u1.T, s2[:, None] * u2.T)
    return {"row": np.asarray(row), "column": np.asarray(column)}


def distill_students(
    base: GPT2,
    params: PyTree,
    teacher_params: PyTree,
    cfgs: Sequence[LoraConfig],
    key: jax.Array,
    optim: OptimConfig,
    *,
    batch_size: int,
    seq_len: int,
    progress: bool = False,
) -> tuple[list[dict], np.ndarray]:
    """Train fresh adapters of each config in `cfgs` on `params` towards the teacher, all at once,
    for ``optim.total_steps`` steps (one population: `make_distill_step`).

    Every student's A is initialised from ``fold_in(key, 0)`` (so every rank starts from the same
    draw, as if trained alone), the training tokens come from ``fold_in(key, 1)``. Only the
    adapters train.

    Returns:
      (each student's LoRA tree at its own rank, training losses (K, steps)).
    """
    from tqdm.auto import trange

    pop = population([Member(cfg, optim.lr) for cfg in cfgs], params)
    loras = [init_lora(jax.random.fold_in(key, 0), cfg, params) for cfg in cfgs]
    variables = stack_variables(params, loras, pop)
    mask = trainable_mask(variables)
    state = init_population(variables, mask, optim, pop)
    step = make_distill_step(base.clone(lora=cfgs[0]), base, optim, pop, batch_size=batch_size, seq_len=seq_len)
    losses = []
    for _ in trange(optim.total_steps, disable=not progress, desc=f"{pop.size} students", leave=False):
        state, values = step(state, teacher_params, jax.random.fold_in(key, 1))
        losses.append(values)
    lora = combine(state.trainable["lora"], state.frozen["lora"])
    students = [member_lora(lora, k, cfg) for k, cfg in enumerate(cfgs)]
    return students, np.asarray(jax.device_get(losses), np.float64).T


def compare_to_planted(lora: Mapping, planted: Mapping) -> dict:
    """A student's update against the planted one, per module and averaged over modules.

    With k the planted rank and r the student's (each adapter with its scale), each module gets
    phi(k, min(k, r)) on the row and column sides of dW (`delta_subspaces`), the LoRA paper's phi on the two A matrices
    ("phi_A"), and the share of the student's dW energy in its top k singular values.

    Returns:
      {"phi_row", "phi_column", "phi_A", "energy_top_k" (module means), "modules": {path: {...}}}.
    """
    spectra = delta_svd(lora)
    targets = flatten_adapters(planted)
    modules = {}
    for path, adapter in flatten_adapters(lora).items():
        target = targets[path]
        k = target["A"].shape[0]
        i, j = k - 1, min(k, adapter["A"].shape[0]) - 1
        phi = delta_subspaces(target, scaling_of(target, path), adapter, scaling_of(adapter, path))
        modules[path] = {
            "phi_row": float(phi["row"][i, j]),
            "phi_column": float(phi["column"][i, j]),
            "phi_A": float(subspace_similarity_grid(target["A"], adapter["A"])[i, j]),
            "energy_top_k": float(spectra[path]["energy"][j]),
        }
    names = ("phi_row", "phi_column", "phi_A", "energy_top_k")
    return {**{n: float(np.mean([m[n] for m in modules.values()])) for n in names}, "modules": modules}
