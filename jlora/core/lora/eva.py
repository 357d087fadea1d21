"""EVA (Paischer et al. 2024, arXiv 2410.07170): A from the principal components of each layer's inputs, and
the ranks redistributed by explained variance, as PEFT's ``peft/tuners/lora/eva.py`` computes them.

A LoRA update B A x only sees the part of x that A keeps. EVA starts A in the directions the adapted
layer's inputs actually vary most, and lets layers whose inputs spread over more directions take more of
the rank budget::

    batches ──forward (base, no adapters)──> x of each adapted layer at the label positions  (n, d_in)
            ──IncrementalPCA.partial_fit──> components (k, d_in), explained-variance ratios (k,)
              (k = round(r * rho) offered per layer; repeated until each layer's top components stop
              moving: cosine >= tau with the previous batch's)
    budget = sum of the layers' r    the budget's largest ratios over all layers win: layer l gets r_l
    A_l = its top r_l components (whitened: / sqrt(singular values)),  B_l = 0,  alpha_l = alpha * r_l / r
                                                                    (with adjust_scaling_factors)

A layer may win 0 components and lose its adapter. The result is an ordinary LoRA: a `LoraConfig` whose
``rank_pattern`` / ``alpha_pattern`` say the new ranks (``resolved``), with A set and B = 0, so
checkpoints, exports and merges treat it as any adapter.

Layers whose inputs are equal (a Llama block's q, k and v projections; gate and up) share one PCA, as in
PEFT: their ratios compete side by side, and the one whose PCA it is gets the largest of their ranks.

The PCA is `IncrementalPCA`, scikit-learn's (and PEFT's) update: the previous components scaled by their
singular values, the new centred rows and a mean correction, stacked and decomposed. jlora takes the
exact SVD in float64 where PEFT takes a randomised one (``svd_lowrank``, q = 2k, 4 power iterations); the
components agree to the randomised SVD's error (`tests/core/lora/test_eva.py` compares them with PEFT's).

>>> import numpy as np
>>> x = np.random.default_rng(0).normal(size=(200, 6)) * [5.0, 3.0, 1.0, 0.1, 0.1, 0.1]
>>> pca = partial_fit(None, x, n_components=3)
>>> np.abs(pca.components[0]).argmax(), round(float(pca.ratios.sum()), 2)
(np.int64(0), 1.0)
>>> redistribute({"a": np.array([0.5, 0.3]), "b": np.array([0.4, 0.01])}, budget=2)
{'a': 1, 'b': 1}
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from jlora.core.lora.config import LoraConfig, targets_for
from jlora.errors import ConfigError


class PCA(NamedTuple):
    """An incremental PCA's state after some batches (scikit-learn's ``IncrementalPCA`` attributes).

    components: (k, d) the principal directions, rows, largest first. singular_values: (k,).
    ratios: (k,) each component's share of the total variance seen. mean, var: (d,). n_seen: rows seen.
    """

    components: np.ndarray
    singular_values: np.ndarray
    ratios: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    n_seen: int


def partial_fit(pca: PCA | None, x: np.ndarray, n_components: int) -> PCA:
    """`pca` updated with the rows of `x` (n, d), n >= n_components (None: the first batch).

    scikit-learn's ``IncrementalPCA.partial_fit`` (as PEFT's port of it computes it), in float64 with an
    exact SVD; signs fixed as its ``svd_flip`` (the largest entry of each component positive).
    """
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    if pca is None:
        mean, var, total = _mean_and_var(x, None, None, 0)
        stacked = x - mean
    else:
        mean, var, total = _mean_and_var(x, pca.mean, pca.var, pca.n_seen)
        batch_mean = x.mean(axis=0)
        correction = math.sqrt(pca.n_seen / total * n) * (pca.mean - batch_mean)
        stacked = np.vstack([pca.singular_values[:, None] * pca.components, x - batch_mean, correction[None]])
    _, s, vt = np.linalg.svd(stacked, full_matrices=False)
    signs = np.sign(vt[np.arange(vt.shape[0]), np.abs(vt).argmax(axis=1)])
    vt = vt * signs[:, None]
    ratios = s**2 / np.sum(var * total)
    return PCA(vt[:n_components], s[:n_components], ratios[:n_components], mean, var, total)


def _mean_and_var(x: np.ndarray, mean, var, n_seen: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The running column mean and variance after the rows of `x` (Chan et al.'s update, as scikit-learn's)."""
    n = x.shape[0]
    total = n_seen + n
    new_sum = x.sum(axis=0)
    centred = x - new_sum / n
    new_unnormalised = (centred**2).sum(axis=0) - centred.sum(axis=0) ** 2 / n
    if n_seen == 0:
        return new_sum / total, new_unnormalised / total, total
    last_sum = mean * n_seen
    ratio = n_seen / n
    unnormalised = var * n_seen + new_unnormalised + ratio / total * (last_sum / ratio - new_sum) ** 2
    return (last_sum + new_sum) / total, unnormalised / total, total


def converged(previous: PCA | None, current: PCA, tau: float) -> np.ndarray:
    """(k,) whether each component's cosine with its previous estimate is >= tau (all False on the first batch)."""
    if previous is None:
        return np.zeros(current.components.shape[0], bool)
    a, b = current.components, previous.components
    cosine = (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-8)
    return cosine >= tau


def redistribute(ratios: Mapping[str, np.ndarray], budget: int) -> dict[str, int]:
    """{layer: rank}: the `budget` largest explained-variance ratios over all layers, counted per layer.

    `ratios` holds each layer's offered ratios (its first round(r * rho)), in layer order; ties go to the
    earlier layer (a stable sort; PEFT sorts with torch's ``argsort``).
    """
    owners = [name for name, values in ratios.items() for _ in values]
    values = np.concatenate([np.asarray(v, np.float64) for v in ratios.values()]) if owners else np.zeros(0)
    order = np.argsort(-values, kind="stable")
    counts = Counter(owners[i] for i in order[:budget])
    return {name: counts.get(name, 0) for name in ratios}


def offered(cfg: LoraConfig, paths: Sequence[str], widths: Mapping[str, int]) -> tuple[dict[str, int], int]:
    """({adapter path: components offered, round(r * rho)}, the rank budget sum(r)), checked against the widths.

    Raises ConfigError when a layer would be offered more components than its input has dimensions.
    """
    rho = cfg.eva.rho
    if rho > 1000:  # PEFT's cap for very large rho: no layer can take more than its widest dimension
        rho = min(rho, max(widths.values()) // cfg.r)
    offer = {p: round(cfg.rank_for(p) * rho) for p in paths}  # Python's round, as PEFT's
    for path, k in offer.items():
        if k > widths[path]:
            raise ConfigError(
                f"EVA offers {path} round(r * rho) = {k} components but its input has {widths[path]} dimensions; "
                f"lower lora.r or lora.eva.rho (r * rho <= {widths[path]})"
            )
    return offer, sum(cfg.rank_for(p) for p in paths)


def resolved(cfg: LoraConfig, ranks: Mapping[str, int], params: Mapping) -> LoraConfig:
    """The `LoraConfig` of EVA's adapters: the layers with a rank, each rank and alpha in the patterns.

    As PEFT's ``_load_eva_state_dict``: a layer at rank 0 is no longer a target; alpha becomes
    alpha * r_new / r where the rank changed and ``adjust_scaling_factors`` is set.
    """
    paths = cfg.module_paths(params)
    kept = [p for p in paths if ranks.get(p, 0) > 0]
    if not kept:
        raise ConfigError("EVA gave every layer rank 0: no adapter is left; raise lora.r")
    rank_pattern, alpha_pattern = {}, {}
    for path in kept:
        r_old, r_new, alpha = cfg.rank_for(path), ranks[path], cfg.alpha_for(path)
        if r_new != r_old and cfg.eva.adjust_scaling_factors:
            alpha *= r_new / r_old
        if r_new != cfg.r:
            rank_pattern[path] = r_new
        if alpha != cfg.alpha:
            alpha_pattern[path] = alpha
    targets = {} if kept == list(paths) else targets_for(kept, every_layer=False)
    return cfg.replace(rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, **targets)


def components(pca: PCA, rank: int, whiten: bool) -> np.ndarray:
    """EVA's A (rank, d_in) from a layer's PCA: its top components (whitened: divided by sqrt(singular values))."""
    u = pca.components[:rank]
    return u / np.sqrt(pca.singular_values[:rank])[:, None] if whiten else u
