"""What an init learns from the first training batches before step 0: the inputs of the adapted layers
(EVA) and the averaged gradient of their weights (LoRA-GA).

    x = layer_inputs(model, params, batch, modules)          # {module path: (B, T, d_in)}, no adapter applied
    eva = eva_adapters(model, params, cfg, batches)          # EvaResult(config, lora, batches, converged)
    g = weight_gradients(model, params, batches, modules)    # {module path: mean gradient of its kernel (d_in, d_out)}

Both read the base model as it is, deterministically (no dropout). `layer_inputs` records what each
`jlora.core.models.linear.Linear` receives through a Flax method interceptor, so the models know nothing of
it; `weight_gradients` differentiates the mean loss of each batch w.r.t. the chosen kernels only (the rest
of the base is a constant, as in the train step) and averages over the batches, as PEFT's
``preprocess_loraga`` does.

>>> import jax, jax.numpy as jnp, numpy as np, jlora
>>> config = jlora.GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2)
>>> model, params = jlora.GPT2(config), jlora.init_params(jax.random.key(0), config)
>>> ids = np.arange(8, dtype=np.int32)[None] % 11
>>> {k: v.shape for k, v in layer_inputs(model, params, ids, ("h.0.mlp.c_proj",)).items()}
{'h.0.mlp.c_proj': (1, 8, 32)}
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jlora.core.lora import eva
from jlora.core.lora.adapter import adapted_shape, split_slice, unflatten_adapters, with_scaling
from jlora.core.lora.config import LoraConfig, block_of, module_kind
from jlora.core.models.family import family_of_paths
from jlora.core.models.linear import Linear
from jlora.core.update.optim import partition
from jlora.core.update.step import gradients
from jlora.errors import ConfigError
from jlora.tree import get_path

PyTree = Any


def without_remat(model):
    """`model` computing every block once (a rematerialised block hides its inputs inside a checkpoint)."""
    return model.clone(config=dataclasses.replace(model.config, remat=False)) if model.config.remat else model


@partial(jax.jit, static_argnums=(0, 3))
def layer_inputs(model, params: PyTree, input_ids: jax.Array, modules: tuple[str, ...]) -> dict[str, jax.Array]:
    """{module path: the input (B, T, d_in) its `Linear` receives} on `input_ids` (B, T), the base alone."""
    seen = {}

    def record(call, args, kwargs, context):
        layer = context.module
        if isinstance(layer, Linear) and context.method_name == "__call__":
            path = ".".join(layer.scope.path)
            if path in modules:
                seen[path] = args[0]
        return call(*args, **kwargs)

    with nn.intercept_methods(record):
        without_remat(model).apply({"params": params}, input_ids, method="hidden")
    missing = sorted(set(modules) - set(seen))
    if missing:
        raise ValueError(f"no linear layer at {missing}")
    return seen


def label_positions(batch: Mapping[str, np.ndarray], use_label_mask: bool) -> np.ndarray:
    """(B, T) bool: the positions whose inputs EVA reads, as PEFT's ``prepare_model_inputs_fn_language_modeling``.

    Real tokens (``attention_mask``); with `use_label_mask`, only those that are labels of the loss. PEFT's
    labels sit on the token itself (``labels[t] = input_ids[t]``), jlora's ``loss_mask[t]`` on the position
    that predicts token t + 1, so the label positions are ``loss_mask`` moved one place right.
    """
    ids = np.asarray(batch["input_ids"])
    mask = np.asarray(batch.get("attention_mask", np.ones(ids.shape)), bool)
    if use_label_mask:
        labels = np.zeros(ids.shape, bool)
        labels[:, 1:] = np.asarray(batch["loss_mask"])[:, :-1] > 0
        mask = mask & labels
    return mask


class EvaResult(NamedTuple):
    """EVA's adapters and how they were found.

    config: the resolved `LoraConfig` (the ranks and alphas in its patterns, rank-0 layers no longer targets).
    lora: the adapters, A = the components, B = 0, each with its scale. ranks: {adapter path: rank}, 0s
    included. batches: how many batches the PCA read. converged: whether every rank's components converged.
    """

    config: LoraConfig
    lora: dict
    ranks: dict[str, int]
    batches: int
    converged: bool


def eva_adapters(
    model,
    params: PyTree,
    cfg: LoraConfig,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    progress: Callable[[int, int], None] | None = None,
) -> EvaResult:
    """EVA's adapters for the layers `cfg` targets in `params`, from `batches` (PEFT's ``get_eva_state_dict``).

    Args:
      model: the base model (GPT-2 or Llama family). params: its parameters.
      cfg: the LoRA config (init "eva"; ``cfg.eva`` its settings, r and the patterns the budget).
      batches: the training batches in order ({"input_ids", "loss_mask"[, "attention_mask"]}); at most
        ``cfg.eva.batches`` are read, fewer once every layer's components have converged.
      progress: called after each batch with (layers converged, layers).

    Raises:
      ConfigError: a layer would be offered more components than its input has dimensions, every layer's
        rank came out 0, or no batch had enough label positions for the PCA.
    """
    settings = cfg.eva
    paths = _model_order(cfg.module_paths(params))
    widths = {p: adapted_shape(params, p)[1] for p in paths}
    offer, budget = eva.offered(cfg, paths, widths)
    module_of = {p: split_slice(p)[0] for p in paths}
    modules = tuple(dict.fromkeys(module_of.values()))
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise ConfigError("EVA needs training batches; the data gave none")

    def selected(batch) -> dict[str, np.ndarray]:
        inputs = layer_inputs(model, params, jnp.asarray(batch["input_ids"]), modules)
        where = label_positions(batch, settings.use_label_mask)
        return {m: np.asarray(x)[where] for m, x in inputs.items()}

    # Layers with equal inputs share one PCA (PEFT hashes each layer's inputs on the first batch).
    x0 = selected(first)
    groups: dict[bytes, list[str]] = {}
    for p in paths:
        groups.setdefault(x0[module_of[p]].tobytes(), []).append(p)
    owner = {p: group[0] for group in groups.values() for p in group}
    for group in groups.values():
        for p in group:
            offer[p] = max(offer[q] for q in group)
    hooks = [group[0] for group in groups.values()]
    order = hooks + [p for p in paths if owner[p] != p]  # PEFT's layer_hook_map: the PCA owners, then the rest

    pcas: dict[str, eva.PCA | None] = dict.fromkeys(hooks)
    done = {h: np.zeros(offer[h], bool) for h in hooks}
    ranks = dict(offer)
    read = 0
    for batch in itertools.chain([first], batches):
        active = [h for h in hooks if not done[h][: ranks[h]].all()]
        if not active or read == settings.batches:
            break
        inputs = x0 if read == 0 else selected(batch)
        for h in active:
            x = inputs[module_of[h]]
            if x.shape[0] < offer[h]:  # fewer label positions than components: PEFT skips the batch too
                continue
            fitted = eva.partial_fit(pcas[h], x, offer[h])
            done[h] = eva.converged(pcas[h], fitted, settings.tau)
            pcas[h] = fitted
        read += 1
        if all(pca is not None for pca in pcas.values()):
            ranks = _ranks(pcas, owner, offer, order, budget)
        if progress is not None:
            progress(sum(bool(done[h][: ranks[h]].all()) for h in hooks), len(hooks))
    if any(pca is None for pca in pcas.values()):
        short = [h for h, pca in pcas.items() if pca is None]
        raise ConfigError(
            f"EVA read {read} batches, none with {offer[short[0]]} label positions for {short[0]}'s PCA; "
            "use larger batches or set lora.eva.use_label_mask=false"
        )
    converged = all(bool(done[owner[p]][: ranks[p]].all()) for p in paths)
    resolved = eva.resolved(cfg, ranks, params)
    flat = {}
    for p in paths:
        if ranks[p] == 0:
            continue
        a = eva.components(pcas[owner[p]], ranks[p], settings.whiten)
        d_out = adapted_shape(params, p)[0]
        flat[p] = {"A": jnp.asarray(a, jnp.float32), "B": jnp.zeros((d_out, ranks[p]), jnp.float32)}
    lora = with_scaling({p: flat[p] for p in resolved.module_paths(params)}, resolved, flat=True)
    return EvaResult(resolved, unflatten_adapters(lora), {p: ranks[p] for p in paths}, read, converged)


def _ranks(pcas, owner, offer, order, budget) -> dict[str, int]:
    """PEFT's ``_get_rank_distribution``: the budget's top ratios per layer, an owner keeping its group's largest."""
    ratios = {p: pcas[owner[p]].ratios[: offer[owner[p]]] for p in order}
    counts = eva.redistribute(ratios, budget)
    for p in order:
        h = owner[p]
        if h != p and counts[h] < counts[p]:  # the PCA's owner holds the largest rank of its group
            counts[h], counts[p] = counts[p], counts[h]
    return counts


def _model_order(paths) -> list[str]:
    """Adapter paths in the model's module order (block, then the family's order of its modules), as PEFT meets them."""
    family = family_of_paths(paths)

    def key(path: str):
        module, part = split_slice(path)
        return block_of(path), family.modules.index(module_kind(module)), part or ""

    return sorted(paths, key=key)


def weight_gradients(
    model, params: PyTree, batches: Iterable[Mapping[str, np.ndarray]], modules: tuple[str, ...]
) -> dict[str, jax.Array]:
    """{module path: the gradient of its kernel (d_in, d_out)}: the mean-loss gradient of each batch, averaged.

    As PEFT's ``estimate_gradients`` (the gradients of the user's steps summed, divided by their number), on
    the deterministic base. Only the kernels of `modules` are differentiated.
    """
    chosen = {m: get_path(params, m)["kernel"] for m in modules}
    mask = jax.tree_util.tree_map_with_path(
        lambda kp, _: ".".join(str(k.key) for k in kp[:-1]) in chosen and kp[-1].key == "kernel", params
    )
    trainable, frozen = partition({"params": params}, {"params": mask})
    total, n = None, 0
    for batch in batches:
        g = _batch_gradient(model, trainable, frozen, {k: jnp.asarray(v) for k, v in batch.items()})
        total = g if total is None else jax.tree.map(jnp.add, total, g)
        n += 1
    if total is None:
        raise ConfigError("LoRA-GA needs training batches; the data gave none")
    return {m: get_path(total["params"], m)["kernel"] / n for m in modules}


@partial(jax.jit, static_argnums=0)
def _batch_gradient(model, trainable, frozen, batch):
    step_batch = {k: batch[k] for k in ("input_ids", "targets", "loss_mask")}
    return gradients(without_remat(model), trainable, frozen, step_batch, None)[0]
