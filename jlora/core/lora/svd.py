"""The singular value spectrum of the LoRA update, read from its factors.

The low-rank hypothesis says a fine-tune's update dW has most of its energy in a few
directions. For an adapter dW = scaling * B A is rank <= r by construction, and its SVD
never needs the dense (d_out x d_in) matrix::

    B   = Q_B R_B          Q_B: (d_out, r)  R_B: (r, r)      (reduced QR)
    A^T = Q_A R_A          Q_A: (d_in, r)   R_A: (r, r)
    dW  = Q_B (scaling R_B R_A^T) Q_A^T  =  Q_B (U_c S V_c^T) Q_A^T     (SVD of the r x r core)
        = U S V^T          U = Q_B U_c: (d_out, r),  V^T = V_c^T Q_A^T: (r, d_in)

exact, in O((d_out + d_in) r^2). From the singular values s (descending) come:

    energy[k-1]     = sum_{i<=k} s_i^2 / sum_i s_i^2          (captured by the top k)
    effective_rank  = exp(-sum_i p_i log p_i),  p_i = s_i / sum s   (Roy & Vetterli 2007)
    stable_rank     = ||dW||_F^2 / s_1^2
    relative_norm   = ||dW||_F / ||W||_F
    amplification   = ||dW||_F / ||U^T W V^T||_F                (LoRA paper, App. H.4)

An all-zero update (B = 0 at initialisation) has norm, effective and stable rank 0 and
energy 1 for every k (the rank-k approximation of zero is exact); nothing is nan.

`subspace_similarity` is the LoRA paper's eq. 4 between two adapters' A matrices, and
`lora_from_delta` goes the other way: the best rank-r factors of a dense update (say a full
fine-tune's), for comparing it with LoRA.

Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of
Equivalence"; PEFT's ``lora/intruders.py``) compare the tuned weight with the base instead: a
top-k left singular vector u'_i of W' (d_out x d_in) is an intruder when no singular vector
of W is like it::

    sim_i = max_j |u'_i . u_j|  over every left singular vector u_j of W;   intruder: sim_i < epsilon

with PEFT's defaults k = 10, epsilon = 0.5 (`intruder_dimensions`; per module of two
parameter trees, `module_intruders`). These need the dense weights and their full SVDs, as
the definition does. (PEFT takes the SVD of the stored weight, which for GPT-2's Conv1D is
W^T, the input side; jlora uses W, the output side, as the paper and PEFT's Linear do.)

>>> import jax, jax.numpy as jnp
>>> a = jax.random.normal(jax.random.key(0), (4, 16)); b = jax.random.normal(jax.random.key(1), (24, 4))
>>> u, s, vt = factored_svd(a, b, scaling=2.0)
>>> bool(jnp.allclose(s, jnp.linalg.svd(2.0 * b @ a, compute_uv=False)[:4], rtol=1e-5))
True
>>> round(float(subspace_similarity(a, a, 4, 4)), 5)
1.0
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import jax
import jax.numpy as jnp

from jlora.core.lora.adapter import factors, flatten_adapters, output_columns, scaling_of, split_slice
from jlora.tree import get_path

HIGHEST = jax.lax.Precision.HIGHEST  # diagnostics: no reduced-precision matmul passes on GPU/TPU


def _mm(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.matmul(x, y, precision=HIGHEST)


def _ratio(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, with 0 / 0 = 0 (and x / 0 = inf), never nan."""
    safe = jnp.where(den > 0, den, 1.0)
    return jnp.where(den > 0, num / safe, jnp.where(num > 0, jnp.inf, 0.0))


@jax.jit
def factored_svd(a: jax.Array, b: jax.Array, scaling: float = 1.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The thin SVD of dW = scaling * B A from its factors, without forming dW.

    Args:
      a: (r, d_in). b: (d_out, r). scaling: alpha / r (or any scale >= 0).

    Returns:
      (u, s, vt) with dW = u diag(s) vt: u (d_out, k), s (k,) descending, vt (k, d_in),
      k = min(r, d_out, d_in), in float32.
    """
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    q_b, r_b = jnp.linalg.qr(b)  # (d_out, k_b), (k_b, r)
    q_a, r_a = jnp.linalg.qr(a.T)  # (d_in, k_a), (k_a, r)
    u_c, s, vt_c = jnp.linalg.svd(scaling * _mm(r_b, r_a.T), full_matrices=False)
    return _mm(q_b, u_c), s, _mm(vt_c, q_a.T)


@jax.jit
def spectrum(singular_values: jax.Array) -> dict[str, jax.Array]:
    """The figures of a spectrum: its energy curve, effective and stable rank, Frobenius norm.

    Args:
      singular_values: (k,) descending, e.g. from `factored_svd` or a dense SVD of a
        full fine-tune's dW (``np.linalg.svd(delta_w, compute_uv=False)``).

    Returns:
      {"singular_values": (k,), "energy": (k,), "effective_rank": (), "stable_rank": (),
      "norm": () = ||dW||_F}.

    >>> fig = spectrum(jnp.array([4.0, 3.0, 0.0]))
    >>> [round(float(x), 4) for x in (*fig["energy"], fig["stable_rank"], fig["norm"])]
    [0.64, 1.0, 1.0, 1.5625, 5.0]
    """
    s = jnp.asarray(singular_values, jnp.float32)
    power = s**2
    total = jnp.sum(power)
    energy = jnp.where(total > 0, jnp.cumsum(power) / jnp.where(total > 0, total, 1.0), 1.0)
    p = _ratio(s, jnp.sum(s))
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return {
        "singular_values": s,
        "energy": energy,
        "effective_rank": jnp.where(total > 0, jnp.exp(entropy), 0.0),
        "stable_rank": _ratio(total, jnp.max(power)),
        "norm": jnp.sqrt(total),
    }


def _projected_norm(w: jax.Array, u: jax.Array, vt: jax.Array) -> jax.Array:
    """||U^T W V^T||_F for W (d_out, d_in): W seen in dW's top singular directions."""
    return jnp.linalg.norm(_mm(_mm(u.T, w.astype(jnp.float32)), vt.T))


@jax.jit
def amplification(w: jax.Array, a: jax.Array, b: jax.Array, scaling: float = 1.0) -> jax.Array:
    """The LoRA paper's amplification factor ||dW||_F / ||U^T W V^T||_F (App. H.4).

    How strongly dW amplifies directions that W itself barely uses; U, V are the top-r
    singular vectors of dW = scaling * B A.

    Args:
      w: (d_out, d_in), the adapted weight in the maths' layout (a GPT-2 kernel is its transpose).
      a: (r, d_in). b: (d_out, r).
    """
    u, s, vt = factored_svd(a, b, scaling)
    return _ratio(jnp.sqrt(jnp.sum(s**2)), _projected_norm(w, u, vt))


@jax.jit
def _figures(adapters: dict, scalings: dict, weights: dict | None) -> dict:
    # Adapters of one shape (every layer's c_attn, say) share one vmapped QR/SVD: one compiled
    # kernel per shape rather than per module. The weights are not stacked (no copies of them).
    groups: dict[tuple, list[str]] = {}
    for path, adapter in adapters.items():
        groups.setdefault((adapter["A"].shape, adapter["B"].shape), []).append(path)
    out = {}
    for paths in groups.values():
        a = jnp.stack([factors(adapters[p])[0].astype(jnp.float32) for p in paths])
        b = jnp.stack([factors(adapters[p])[1].astype(jnp.float32) for p in paths])
        u, s, vt = jax.vmap(factored_svd)(a, b, jnp.stack([scalings[p] for p in paths]))
        s = jnp.pad(s, ((0, 0), (0, a.shape[1] - s.shape[1])))  # r > min(d_out, d_in): the rest are 0
        figs = jax.vmap(spectrum)(s)
        for n, path in enumerate(paths):
            fig = {name: value[n] for name, value in figs.items()}
            if weights is not None:
                kernel = weights[path]  # (d_in, d_out): W is the transpose of the adapted columns
                w = kernel[:, output_columns(path, kernel.shape[1])].T
                fig["relative_norm"] = _ratio(fig["norm"], jnp.linalg.norm(w.astype(jnp.float32)))
                fig["amplification"] = _ratio(fig["norm"], _projected_norm(w, u[n], vt[n]))
            out[path] = fig
    return out


def delta_svd(lora: Mapping, params: Mapping | None = None) -> dict[str, dict[str, jax.Array]]:
    """The spectrum of every adapter's update dW = scaling * B A, without forming any dW.

    Args:
      lora: the adapters (each with the scale it carries).
      params: the base tree; with it each module also gets "relative_norm" and
        "amplification" against the weight columns it adapts.

    Returns:
      {module path: {"singular_values": (r,), "energy": (r,), "effective_rank", "stable_rank",
      "norm" [, "relative_norm", "amplification"]}} (0-d arrays besides the two (r,) ones).
    """
    adapters = flatten_adapters(lora)
    scalings = {path: scaling_of(adapter, path) for path, adapter in adapters.items()}
    weights = None if params is None else {path: get_path(params, split_slice(path)[0])["kernel"] for path in adapters}
    figures = _figures(adapters, scalings, weights)
    return {path: figures[path] for path in adapters}  # jit returns dicts key-sorted: h.10 before h.2


def _right_vectors(a: jax.Array) -> jax.Array:
    """(r, d_in) -> V^T (r, d_in): the right singular vectors of A as rows, by singular value."""
    return jnp.linalg.svd(a.astype(jnp.float32), full_matrices=False)[2]


def subspace_similarity(a1: jax.Array, a2: jax.Array, i: int, j: int) -> jax.Array:
    """The LoRA paper's normalised subspace similarity (eq. 4), in [0, 1].

        phi(A1, A2, i, j) = ||U1_i^T U2_j||_F^2 / min(i, j)

    with U1_i the top-i right singular vectors of A1 (d_in, i) and U2_j the top-j of A2:
    1 when one subspace contains the other, 0 when they are orthogonal.

    Args:
      a1: (r1, d_in). a2: (r2, d_in). i: 1..r1. j: 1..r2 (Python ints).
    """
    r1, r2 = a1.shape[0], a2.shape[0]
    if not (1 <= i <= r1 and 1 <= j <= r2):
        raise ValueError(f"need 1 <= i <= {r1} and 1 <= j <= {r2}, got i={i}, j={j}")
    return subspace_similarity_grid(a1, a2)[i - 1, j - 1]


@jax.jit
def subspace_similarity_grid(a1: jax.Array, a2: jax.Array) -> jax.Array:
    """phi(A1, A2, i, j) for every i in 1..r1 and j in 1..r2, as an (r1, r2) array (paper Fig. 3).

    >>> a = jnp.eye(3, 5)
    >>> subspace_similarity_grid(a, a[:2]).round(3).tolist()
    [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
    """
    if a1.shape[1] != a2.shape[1]:
        raise ValueError(f"A1 {a1.shape} and A2 {a2.shape} act on different input sizes")
    overlap = _mm(_right_vectors(a1), _right_vectors(a2).T) ** 2  # (r1, r2): (u1_k . u2_l)^2
    captured = jnp.cumsum(jnp.cumsum(overlap, axis=0), axis=1)  # [i-1, j-1] = ||U1_i^T U2_j||_F^2
    i, j = jnp.arange(1, a1.shape[0] + 1), jnp.arange(1, a2.shape[0] + 1)
    return jnp.clip(captured / jnp.minimum(i[:, None], j[None, :]), 0.0, 1.0)


def lora_from_delta(delta_w: jax.Array, r: int, scaling: float = 1.0) -> tuple[dict[str, jax.Array], jax.Array]:
    """The best rank-r LoRA factors of a dense update, by truncated SVD (Eckart–Young).

    Args:
      delta_w: (d_out, d_in), e.g. a full fine-tune's W_ft - W (a GPT-2 kernel difference
        is (d_in, d_out): pass its transpose).
      r: the rank to keep. scaling: the adapter's alpha / r; the factors are divided by it,
        so that ``scaling * B A`` is the best rank-r approximation of `delta_w`.

    Returns:
      ({"A": (r, d_in), "B": (d_out, r)}, energy kept: sum of the top r s_i^2 / sum of all),
      in float32. The singular values are split evenly between B and A (sqrt each).
    """
    d_out, d_in = delta_w.shape
    if not (isinstance(r, int) and 1 <= r <= min(d_out, d_in)):
        raise ValueError(f"rank must be an integer in 1..{min(d_out, d_in)}, got r={r!r}")
    if not scaling > 0:
        raise ValueError(f"scaling must be > 0, got {scaling!r}")
    return _truncate(jnp.asarray(delta_w), r, scaling)


@partial(jax.jit, static_argnums=1)
def _truncate(delta_w: jax.Array, r: int, scaling: float) -> tuple[dict[str, jax.Array], jax.Array]:
    u, s, vt = jnp.linalg.svd(delta_w.astype(jnp.float32), full_matrices=False)
    root = jnp.sqrt(s[:r] / scaling)
    adapter = {"A": root[:, None] * vt[:r], "B": u[:, :r] * root[None, :]}
    return adapter, spectrum(s)["energy"][r - 1]


@partial(jax.jit, static_argnums=2)
def _intruder_similarity(w_base: jax.Array, w_tuned: jax.Array, k: int) -> jax.Array:
    u_base = jnp.linalg.svd(w_base.astype(jnp.float32), full_matrices=False)[0]  # (d_out, min)
    u_tuned = jnp.linalg.svd(w_tuned.astype(jnp.float32), full_matrices=False)[0][:, :k]
    return jnp.max(jnp.abs(_mm(u_tuned.T, u_base)), axis=1)


def intruder_dimensions(
    w_base: jax.Array, w_tuned: jax.Array, k: int = 10, epsilon: float = 0.5
) -> tuple[int, jax.Array]:
    """How many of W''s top-k left singular vectors are intruders (max |cos| with W's below `epsilon`).

    Args:
      w_base, w_tuned: (d_out, d_in), the weight before and after fine-tuning (maths layout:
        a GPT-2 kernel is its transpose).
      k: the top singular vectors of `w_tuned` to test (at most min(d_out, d_in)).
      epsilon: the similarity below which a vector counts as an intruder.

    Returns:
      (count, sim): sim (k,) the best |cosine| of each top-k vector with any of W's.

    >>> w = jnp.diag(jnp.arange(8.0, 0.0, -1.0))
    >>> u = jnp.full(8, 8**-0.5)                            # |cos| 0.35 with each of W's singular vectors
    >>> count, sim = intruder_dimensions(w, w + 20.0 * jnp.outer(u, u), k=3)   # it tops W': an intruder
    >>> count, [round(float(x), 2) for x in sim]
    (1, [0.42, 0.86, 0.75])
    """
    if w_base.shape != w_tuned.shape:
        raise ValueError(f"the base {w_base.shape} and tuned {w_tuned.shape} weights differ in shape")
    if not (isinstance(k, int) and k >= 1 and 0 < epsilon <= 1):
        raise ValueError(f"need an integer k >= 1 and 0 < epsilon <= 1, got k={k!r}, epsilon={epsilon!r}")
    sim = _intruder_similarity(w_base, w_tuned, min(k, *w_base.shape))
    return int(jnp.sum(sim < epsilon)), sim


def module_intruders(
    before: Mapping, after: Mapping, paths, k: int = 10, epsilon: float = 0.5
) -> dict[str, dict[str, object]]:
    """`intruder_dimensions` of every module path between two parameter trees.

    Args:
      before, after: base trees (e.g. the base, and a full fine-tune's or ``merge(params, lora)``).
      paths: module paths ("h.0.attn.c_attn", slices allowed), e.g. ``flatten_adapters(lora)``.

    Returns:
      {path: {"intruders": count, "similarity": (k,) best |cosine| of each top-k vector}}.
    """
    out = {}
    for path in paths:
        module = split_slice(path)[0]
        w0, w1 = get_path(before, module)["kernel"], get_path(after, module)["kernel"]
        cols = output_columns(path, w0.shape[1])
        count, sim = intruder_dimensions(w0[:, cols].T, w1[:, cols].T, k, epsilon)
        out[path] = {"intruders": count, "similarity": sim}
    return out
