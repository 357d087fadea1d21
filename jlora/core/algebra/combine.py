"""Adapters as values: one adapter made from several, in every way PEFT combines them.

The name is `combine_adapters` because `jlora.combine` already is the inverse of
`jlora.partition` (the trainable and frozen halves back into one tree, as equinox names that
pair). PEFT's ``add_weighted_adapter(adapters, weights, combination_type=...)`` has eleven
types in two families (``peft/tuners/lora/model.py``); every one is here with PEFT's meaning of
the weights, `density`, `majority_sign_method` and the rank (PEFT's ``svd_rank``, here `r`).
With c_i = w_i * scaling_i for adapter i of the n (each adapter's scale is the one it carries)::

    on the factors: the result has the inputs' rank r (they must agree, module by module)
      linear, ties, dare_linear, dare_ties, magnitude_prune
          A' = merge(sign(c_i) sqrt|c_i| A_i),   B' = merge(sqrt|c_i| B_i)       merge: `task_vectors`
          (the A's and the B's are merged apart; TIES' trim and sign election see the A_i, B_i
          themselves, as in PEFT; note (sum sqrt(c_i) B_i)(sum sqrt(c_i) A_i) has cross terms)
      cat A' = [c_1 A_1; ...; c_n A_n]  (sum r_i, d_in),   B' = [B_1 ... B_n]  (d_out, sum r_i)
          exactly sum_i c_i B_i A_i, at rank sum r_i
    on the update: dW_i = scaling_i B_i A_i (d_out, d_in) merged, then factored again to rank r
      svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd
          dW' = merge(dW_i, w),   dW' = U S V^T:   B' = U_r S_r  (d_out, r),   A' = V_r^T  (r, d_in)
          r: `r`, default the largest rank among the inputs; `clamp` (PEFT's svd_clamp): B' and A'
          clipped to +-the `clamp` quantile of their entries

    the result: scale 1 on every module (alpha = r, as PEFT sets it), with the LoraConfig that describes it

Plain svd never forms dW': ``sum_i c_i B_i A_i = [c_1 B_1 ... c_n B_n] [A_1; ...; A_n]`` is an
update in factored form of rank sum r_i, whose SVD comes from QR of the two factors and an SVD
of the small core (`jlora.core.lora.svd.factored_svd`); the pruned variants merge dW entry by entry,
so they form it and take its SVD. DARE's drop is random: its keep masks come from an explicit
PRNG `key` (`dare_masks`) or are given (`mask`), so a combination is a pure function.

A module only some adapters adapt combines those that do (PEFT's rule: for every method an
absent adapter acts as a zero task vector). Where jlora departs from PEFT: one adapter is
combined by the method asked (PEFT switches to linear), the result is never rsLoRA (PEFT keeps
the first adapter's ``use_rslora`` beside alpha = r, which makes its scaling sqrt(r), not 1), and
DoRA adapters are refused (their magnitudes are not task vectors). `combine_leaves` merges trained
base leaves (``modules_to_save``, e.g. ln_f) as task vectors from the base, which PEFT refuses.

>>> import jax, jax.numpy as jnp
>>> a = {"h": {"0": {"attn": {"c_attn": {"A": jnp.ones((2, 4)), "B": jnp.ones((12, 2)), "scaling": 2.0}}}}}
>>> new_cfg, new = combine_adapters([a, a], [0.5, 0.25], method="cat")
>>> c_attn = new["h"]["0"]["attn"]["c_attn"]
>>> new_cfg.r, new_cfg.alpha, c_attn["A"].shape, float(c_attn["scaling"])
(4, 4.0, (4, 4), 1.0)
>>> float((c_attn["B"] @ c_attn["A"])[0, 0])   # 0.75 * 2 * 2
3.0
"""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jlora.core.algebra import task_vectors as tv
from jlora.core.lora.adapter import (
    SCALE,
    Adapter,
    factors,
    flatten_adapters,
    scaling_of,
    split_slice,
    unflatten_adapters,
)
from jlora.core.lora.config import QKV, LoraConfig, path_order, targets_for
from jlora.core.lora.merge import delta_w
from jlora.core.lora.svd import factored_svd
from jlora.errors import CheckpointError, ConfigError
from jlora.tree import leaves_by_path, unflatten

# method -> the task-tensor merge it applies (to the factors, or to the dense updates)
FACTOR_METHODS = {
    "linear": "task_arithmetic",
    "ties": "ties",
    "dare_linear": "dare_linear",
    "dare_ties": "dare_ties",
    "magnitude_prune": "magnitude_prune",
}
UPDATE_METHODS = {
    "svd": "task_arithmetic",
    "ties_svd": "ties",
    "dare_linear_svd": "dare_linear",
    "dare_ties_svd": "dare_ties",
    "magnitude_prune_svd": "magnitude_prune",
}
METHODS = ("svd", "linear", "cat", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd")
METHODS += ("dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")  # PEFT's order
LEAF_STREAM = 2**31 - 1  # fold_in tag of the trained base leaves' DARE masks, apart from the adapters'

Adapters = Sequence[Mapping]  # adapter trees, each adapter with the scale it carries


def merge_of(method: str) -> str:
    """The `task_vectors` merge a combination method applies (cat: task arithmetic of the updates)."""
    return {**FACTOR_METHODS, **UPDATE_METHODS, "cat": "task_arithmetic"}[method]


def uses_density(method: str) -> bool:
    return merge_of(method) != "task_arithmetic"


def is_dare(method: str) -> bool:
    return merge_of(method).startswith("dare")


def check_options(
    method: str,
    n: int,
    weights: Sequence[float],
    *,
    density: float | None = None,
    r: int | None = None,
    majority_sign_method: str = "total",
    clamp: float | None = None,
) -> None:
    """ConfigError (one line) for options `method` cannot take, before any adapter is read."""
    if method not in METHODS:
        raise ConfigError(f"unknown combination method {method!r}; valid: {', '.join(METHODS)}")
    if n < 1:
        raise ConfigError("combining needs at least one adapter")
    if len(weights) != n or not all(_is_number(w) and math.isfinite(w) for w in weights):
        raise ConfigError(f"weights {list(weights)} do not match the {n} adapters: give {n} finite numbers")
    if uses_density(method):
        if density is None or not _is_number(density) or not 0 < density <= 1:
            raise ConfigError(f"{method} needs a density in (0, 1] (the share of entries kept), got {density!r}")
    elif density is not None:
        raise ConfigError(f"{method} takes no density; ties, dare_* and magnitude_prune* do")
    if r is not None and not method.endswith("svd"):
        raise ConfigError(f"{method} keeps the inputs' ranks and takes no r; the *svd methods re-factor to rank r")
    if r is not None and not (isinstance(r, int) and not isinstance(r, bool) and r >= 1):
        raise ConfigError(f"r must be a positive integer, got r={r!r}")
    if majority_sign_method not in tv.SIGN_METHODS:
        raise ConfigError(
            f"majority_sign_method must be one of {', '.join(tv.SIGN_METHODS)}, got {majority_sign_method!r}"
        )
    if clamp is not None and (not method.endswith("svd") or not _is_number(clamp) or not 0 < clamp <= 1):
        raise ConfigError(f"clamp (a quantile in (0, 1]) applies to the *svd methods only; got {clamp!r} with {method}")


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _order(path: str) -> tuple:
    """Sort key of adapter paths: block, module, then the fused module before its q, k, v slices."""
    module, part = split_slice(path)
    return path_order(module), 0 if part is None else 1 + QKV.index(part)


def adapters_by_path(adapters: Adapters) -> dict[str, list[tuple[int, Adapter, jax.Array]]]:
    """{adapter path: [(input index, {"A", "B"}, scaling), ...] for the inputs that adapt it}, in model order.

    Raises CheckpointError for what neither combines nor stacks (`jlora.core.algebra.mixed`): a DoRA adapter,
    factors that do not fit each other (adapters of different bases), a fused module in one input
    and its slices in another.
    """
    by_path: dict[str, list] = collections.defaultdict(list)
    for i, lora in enumerate(adapters):
        for path, adapter in flatten_adapters(lora).items():
            if "m" in adapter:
                raise CheckpointError(
                    f"adapter {i} is a DoRA adapter ({path} has a magnitude m); DoRA magnitudes rescale the base's "
                    "output and neither combine nor stack: use plain LoRA adapters"
                )
            if "E" in adapter:  # AdaLoRA's B diag(E) A: the plain adapter (diag(E) A, B)
                adapter = {**{k: v for k, v in adapter.items() if k != "E"}, "A": factors(adapter)[0]}
            by_path[path].append((i, adapter, scaling_of(adapter, path)))
    for path, present in by_path.items():
        (i0, first, _), *rest = present
        for i, adapter, _ in rest:
            if adapter["A"].shape[1] != first["A"].shape[1] or adapter["B"].shape[0] != first["B"].shape[0]:
                raise CheckpointError(
                    f"{path}: adapter {i} maps {adapter['A'].shape[1]} -> {adapter['B'].shape[0]} features, adapter "
                    f"{i0} {first['A'].shape[1]} -> {first['B'].shape[0]}: adapters of different base models"
                )
        module, part = split_slice(path)
        if part is not None and module in by_path:
            raise CheckpointError(
                f"{module} is adapted whole by adapter {by_path[module][0][0]} and in slices ({path}) by adapter "
                f"{present[0][0]}; adapters used together must adapt it the same way"
            )
    return {p: by_path[p] for p in sorted(by_path, key=_order)}


def dare_masks(key: jax.Array, adapters: Adapters, method: str, density: float) -> list[dict[str, Any]]:
    """The keep masks `combine_adapters` draws from `key` for a DARE method: one dict per adapter.

    ``masks[i][path]`` is ``{"A": (r, d_in), "B": (d_out, r)}`` bool for dare_linear / dare_ties
    (they drop entries of the factors) and one (d_out, d_in) bool array for the *_svd variants
    (they drop entries of dW); each entry is True with probability `density`. Adapter i's mask at
    the j-th path (in model order) comes from ``fold_in(fold_in(key, i), j)``, so it does not
    depend on the other adapters' shapes.
    """
    paths = list(adapters_by_path(adapters))
    masks: list[dict[str, Any]] = []
    for i, lora in enumerate(adapters):
        own = {}
        for path, adapter in flatten_adapters(lora).items():
            k = jax.random.fold_in(jax.random.fold_in(key, i), paths.index(path))
            a, b = adapter["A"], adapter["B"]
            if method in UPDATE_METHODS:
                own[path] = tv.drop_mask(k, (b.shape[0], a.shape[1]), density)
            else:
                key_a, key_b = jax.random.split(k)
                own[path] = {"A": tv.drop_mask(key_a, a.shape, density), "B": tv.drop_mask(key_b, b.shape, density)}
        masks.append(own)
    return masks


def combine_adapters(
    adapters: Adapters,
    weights: Sequence[float],
    method: str = "svd",
    *,
    density: float | None = None,
    r: int | None = None,
    key: jax.Array | None = None,
    mask: Sequence[Mapping[str, Any]] | None = None,
    majority_sign_method: str = "total",
    clamp: float | None = None,
) -> tuple[LoraConfig, dict]:
    """One adapter from `adapters`, as PEFT's ``add_weighted_adapter`` makes it (see the module doc).

    Args:
      adapters: the inputs' adapter trees, each adapter with its scale; ranks, scales and modules may
        differ (the factor methods need one rank per module among the inputs that adapt it).
      weights: one number per adapter, negative allowed (subtracting a task).
      method: one of `METHODS` (PEFT's combination_type; default "svd", as PEFT's).
      density: the share of entries kept, in (0, 1], for ties*, dare_* and magnitude_prune*.
      r: the rank of the *svd methods' result (PEFT's svd_rank); default the largest input rank.
      key, mask: DARE's keep masks, drawn from a PRNG key (`dare_masks`) or given in that layout;
        not needed at density 1, where DARE drops nothing.
      majority_sign_method: "total" or "frequency", for the TIES methods.
      clamp: the *svd methods' svd_clamp quantile, in (0, 1] (None: no clipping).

    Returns:
      (config, adapter tree): an ordinary adapter of scale 1 on every module it adapts, and the
      `LoraConfig` that describes it (for export).

    Raises:
      ConfigError: a bad option or rank; CheckpointError: adapters the method cannot combine.
    """
    check_options(
        method,
        len(adapters),
        weights,
        density=density,
        r=r,
        majority_sign_method=majority_sign_method,
        clamp=clamp,
    )
    if mask is not None and not is_dare(method):
        raise ConfigError(f"mask= holds DARE's keep masks; {method} drops nothing")
    by_path = adapters_by_path(adapters)
    if is_dare(method) and density < 1 and mask is None:
        if key is None:
            raise ConfigError(f"{method} drops entries at random: pass key= (a PRNG key) or mask= (its keep masks)")
        mask = dare_masks(key, adapters, method, density)
    options = dict(density=density, majority_sign_method=majority_sign_method)
    largest = max(a["A"].shape[0] for present in by_path.values() for _, a, _ in present)
    flat = {}
    for path, present in by_path.items():
        factors = [{"A": a["A"], "B": a["B"]} for _, a, _ in present]
        w = [float(weights[i]) for i, _, _ in present]
        scalings = [s for _, _, s in present]
        if method in FACTOR_METHODS:
            _check_ranks(method, path, factors)
            flat[path] = _factor_merge(method, factors, w, scalings, _keep(mask, present, path), **options)
        elif method == "cat":
            flat[path] = _cat(factors, w, scalings)
        else:
            rank = _rank(method, path, factors, r, largest)
            keep = _keep(mask, present, path)
            flat[path] = _update_merge(method, factors, w, scalings, keep, rank=rank, clamp=clamp, **options)
    flat = {path: {**adapter, SCALE: jnp.ones((), jnp.float32)} for path, adapter in flat.items()}
    return result_config(flat), unflatten_adapters(flat)


def _keep(mask, present, path) -> Any:
    """The present adapters' keep masks at `path`, stacked ((n, ...) or {"A", "B"} of those), or None."""
    if mask is None:
        return None
    try:
        masks = [mask[i][path] for i, _, _ in present]
    except (KeyError, IndexError, TypeError):
        raise ConfigError(f"mask has no keep mask for {path} of every adapter that adapts it") from None
    return jax.tree.map(lambda *m: jnp.stack([jnp.asarray(x, bool) for x in m]), *masks)


def _check_ranks(method, path, factors) -> None:
    ranks = sorted({a["A"].shape[0] for a in factors})
    if len(ranks) > 1:
        raise CheckpointError(
            f"{method} merges the factors, which needs one rank per module: {path} has ranks {ranks}; "
            "use cat, svd or a *_svd method"
        )


# Each module's combination is one compiled program per method and shapes (a GPT-2's blocks share them).
_STATIC = ("method", "density", "majority_sign_method")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _factor_merge(method, factors, w, scalings, keep, *, density, majority_sign_method) -> Adapter:
    c = jnp.asarray(w, jnp.float32) * jnp.asarray(scalings, jnp.float32)
    root = jnp.sqrt(jnp.abs(c))  # the weight split over both factors; its sign goes to A
    weights = {"A": jnp.where(c >= 0, root, -root), "B": root}
    if keep is not None and not isinstance(keep, Mapping):
        raise ConfigError(f"{method} drops entries of A and B: its masks are {{'A': ..., 'B': ...}} per module")
    out = {}
    for name in ("A", "B"):
        tensors = jnp.stack([a[name].astype(jnp.float32) for a in factors])
        out[name] = tv.merge(
            merge_of(method),
            tensors,
            weights[name],
            density=density,
            keep=None if keep is None else keep[name],
            majority_sign_method=majority_sign_method,
        )
    return out


@jax.jit
def _cat(factors, w, scalings) -> Adapter:
    return {
        "A": jnp.concatenate([a["A"].astype(jnp.float32) * (wi * s) for a, wi, s in zip(factors, w, scalings)]),
        "B": jnp.concatenate([a["B"].astype(jnp.float32) for a in factors], axis=1),
    }


@functools.partial(jax.jit, static_argnames=(*_STATIC, "rank", "clamp"))
def _update_merge(method, factors, w, scalings, keep, *, density, majority_sign_method, rank, clamp) -> Adapter:
    """The merged update re-factored: its SVD from the factors for plain svd, else of the dense dW'."""
    if method == "svd":  # sum_i c_i B_i A_i in factored form: never dense
        a = jnp.concatenate([a["A"].astype(jnp.float32) for a in factors])
        b = jnp.concatenate([a["B"].astype(jnp.float32) * (wi * s) for a, wi, s in zip(factors, w, scalings)], axis=1)
        u, s, vt = factored_svd(a, b)
    else:
        deltas = jnp.stack([delta_w(a["A"], a["B"], s) for a, s in zip(factors, scalings)])
        merged = tv.merge(
            UPDATE_METHODS[method],
            deltas,
            jnp.asarray(w, jnp.float32),
            density=density,
            keep=keep,
            majority_sign_method=majority_sign_method,
        )
        u, s, vt = jnp.linalg.svd(merged, full_matrices=False)
    return _refactor(u, s, vt, rank, clamp)


def _rank(method, path, factors, r, largest) -> int:
    """The result's rank at `path`: `r` if the method can produce it there, else a ConfigError; default `largest`."""
    if r is None:
        return largest
    a, b = factors[0]["A"], factors[0]["B"]
    bound, why = min(a.shape[1], b.shape[0]), f"its weight is {a.shape[1]} -> {b.shape[0]}"
    total = sum(x["A"].shape[0] for x in factors)
    if method == "svd" and total < bound:
        bound, why = total, f"the weighted sum of the updates there has rank at most {total}, the sum of their ranks"
    if r > bound:
        raise ConfigError(f"r={r} is more than {method} can produce at {path}: at most {bound} ({why})")
    return r


def _refactor(u, s, vt, r, clamp) -> Adapter:
    """B = U_r S_r, A = V_r^T (zero-padded past the update's own rank), optionally clamped as PEFT does."""
    extra = r - s.shape[0]
    if extra > 0:  # the default rank exceeds what this module's update has: zero directions, as PEFT's
        u, s, vt = jnp.pad(u, ((0, 0), (0, extra))), jnp.pad(s, (0, extra)), jnp.pad(vt, ((0, extra), (0, 0)))
    b, a = u[:, :r] * s[None, :r], vt[:r]
    if clamp is not None:
        high = jnp.quantile(jnp.concatenate([b.reshape(-1), a.reshape(-1)]), clamp)
        b, a = jnp.clip(b, -high, high), jnp.clip(a, -high, high)
    return {"A": a, "B": b}


def result_config(flat: Mapping[str, Adapter]) -> LoraConfig:
    """The LoraConfig of a combined adapter: its modules, its ranks, alpha = r (scaling 1), no rsLoRA."""
    ranks = {path: int(adapter["A"].shape[0]) for path, adapter in flat.items()}
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    paths = tuple(ranks)
    cfg = LoraConfig(
        r=r,
        alpha=float(r),
        **targets_for(paths),
        rank_pattern={p: k for p, k in ranks.items() if k != r},
        alpha_pattern={p: float(k) for p, k in ranks.items() if k != r},
    )
    assert cfg.module_paths(paths) == paths and all(cfg.scaling_for(p) == 1.0 for p in paths), cfg
    return cfg


def combine_leaves(
    base: Mapping,
    leaves: Sequence[Mapping | None],
    weights: Sequence[float],
    method: str,
    *,
    density: float | None = None,
    key: jax.Array | None = None,
    majority_sign_method: str = "total",
) -> dict:
    """Trained base leaves (``modules_to_save``) of several adapters, merged as task vectors from the base.

    ``base + merge(leaf_i - base, w)`` per leaf, with the method's merge (`merge_of`: cat, linear
    and svd add the weighted differences, ties* trims and elects signs, ...); an adapter without
    the leaf adds a zero difference. DARE's masks are drawn from ``fold_in(key, LEAF_STREAM)``.

    Args:
      base: the base tree (the leaves' values before training).
      leaves: each adapter's trained leaves in the base tree's layout (None or {}: none).
    Returns:
      The merged leaves in the base tree's layout ({} when no adapter trains any).
    """
    check_options(method, len(leaves), weights, density=density, majority_sign_method=majority_sign_method)
    trained = [leaves_by_path(t or {}) for t in leaves]
    paths = sorted({p for t in trained for p in t})
    base_leaves = leaves_by_path(base)
    merge, out = merge_of(method), {}
    for j, path in enumerate(paths):
        if path not in base_leaves:
            raise CheckpointError(f"trained base leaf {path} is not in the base model")
        origin = jnp.asarray(base_leaves[path], jnp.float32)
        deltas = jnp.stack([jnp.asarray(t[path], jnp.float32) - origin if path in t else 0 * origin for t in trained])
        keep = None
        if merge.startswith("dare") and density < 1:
            if key is None:
                raise ConfigError(f"{method} drops entries at random: pass key= (a PRNG key)")
            keys = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, LEAF_STREAM), j), len(trained))
            keep = jnp.stack([tv.drop_mask(k, origin.shape, density) for k in keys])
        delta = tv.merge(
            merge,
            deltas,
            jnp.asarray(weights, jnp.float32),
            density=density,
            keep=keep,
            majority_sign_method=majority_sign_method,
        )
        out[path] = (origin + delta).astype(jnp.asarray(base_leaves[path]).dtype)
    return unflatten(out)
