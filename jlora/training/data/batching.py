"""Batches shaped to their content: no compute on padding, and the positions that carry loss listed.

`batch_at` and `eval_batches` give B rows padded to ``seq_len`` T. `shape_batch` turns such a
batch into the one a step computes on, in the `Layout` the run config chooses::

    rows   (pack off)  row i stays row i, cut to L = round_up(longest row)                 (B, L)
    packed (pack on)   whole rows end to end in R sequences of at most T tokens, longest
                       row first into the emptiest sequence, L = round_up(fullest one)     (R, L)

    rows             packed, R = 1:  e p c c e | e q c e | e r r c c e | .  .
    e p c c e .      segment_ids     1 1 1 1 1   2 2 2 2   3 3 3 3 3 3   0  0
    e q c e . .      position_ids    0 1 2 3 4   0 1 2 3   0 1 2 3 4 5   0  0
    e r r c c e

A packed sequence carries ``segment_ids`` (0 on padding) and ``position_ids`` restarting at 0 in
each row: the model attends only within a segment, so every row sees exactly what it sees alone.
Both layouts list the positions that carry loss, ``loss_index`` (R, K): each sequence's loss
positions in order, filled up with a position that carries none (there is one whenever fewer than
K <= L positions carry loss). The loss (`jlora.core.update.loss`) computes the LM head there only.

The bucket rule lives here, in `round_up`: with "octaves" (the default) lengths round up to a
multiple of 8 up to 64, then to four lengths per doubling (80, 96, 112, 128, 160, ...), so padding
stays under a quarter of a batch while the lengths a run can take grow only with the logarithm of
``seq_len``; with ``data.buckets`` N to a multiple of N; with "pow2" to a power of two; with "none"
to T (every batch T wide, the old layout). The loss capacity K rounds up to a power of two (at
least 8), at most L. A compiled step is specialised to the shape (R, L, K), so a run compiles one
step per distinct shape its batches have: at most `shape_bound` (fixed by the config), and exactly
``len(run_shapes(...).shapes)``, which `jlora train` prints on its first line with the share of
computed tokens that are padding.

Everything is a pure function of the rows it is given, so ``shape_batch(batch_at(data, step, ...))``
is still a function of the step and a resumed run sees the very same arrays.

>>> import numpy as np
>>> round_up(50, 64, 512), round_up(65, 64, 512), round_up(50, "pow2", 512), round_up(50, "none", 512)
(64, 128, 64, 512)
>>> [round_up(n, "octaves", 512) for n in (5, 50, 57, 65, 100, 300, 500)]
[8, 56, 64, 80, 112, 320, 512]
>>> batch = {"input_ids": np.array([[9, 1, 2, 9, 9, 9], [9, 3, 9, 9, 9, 9]]),
...          "targets": np.array([[1, 2, 9, 9, 9, 9], [3, 9, 9, 9, 9, 9]]),
...          "loss_mask": np.array([[0, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], np.float32),
...          "attention_mask": np.array([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])}
>>> packed = shape_batch(batch, Layout(buckets=1, pack=True))
>>> packed["input_ids"].tolist(), packed["segment_ids"].tolist(), packed["position_ids"].tolist()
([[9, 1, 2, 9, 3]], [[1, 1, 1, 2, 2]], [[0, 1, 2, 0, 1]])
>>> packed["loss_index"].tolist()  # K = 8 capped at L = 5: the 4 loss positions, then one without
[[1, 2, 3, 4, 0]]
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import NamedTuple

import numpy as np

from jlora.errors import ConfigError
from jlora.training.data.rows import TokenizedData, batch_indices

MIN_CAPACITY = 8  # smaller loss capacities would only add compiled shapes
OCTAVE_STEPS = 4  # "octaves": bucket lengths per doubling of length
OCTAVE_MIN_STEP = 8  # "octaves": no finer than multiples of 8 (shorter rows cost little either way)
BUCKET_RULES = ("octaves", "pow2", "none")


@dataclasses.dataclass(frozen=True)
class Layout:
    """How batches are shaped (see the module docstring).

    buckets: "octaves" (multiples of 8 up to 64, then four lengths per doubling), N (multiples
      of N), "pow2" or "none" (always seq_len).
    pack: several rows per sequence (attention confined to each, positions restarting).
    row_multiple: the number of sequences is a multiple of this (devices x micro-batches),
      so a packed batch still splits evenly; rows are never split.
    """

    buckets: int | str = "octaves"
    pack: bool = False
    row_multiple: int = 1

    def __post_init__(self):
        check_buckets(self.buckets)


def check_buckets(rule: int | str) -> None:
    """Raise ConfigError unless `rule` is a positive int, "octaves", "pow2" or "none"."""
    if isinstance(rule, bool) or not (rule in BUCKET_RULES or (isinstance(rule, int) and rule > 0)):
        raise ConfigError(f"data.buckets must be a positive length step, 'octaves', 'pow2' or 'none', got {rule!r}")


def round_up(n: int, rule: int | str, limit: int) -> int:
    """The bucket of a length `n` (1 <= n <= limit) under `rule`, never above `limit`."""
    if rule == "none":
        return limit
    power = 1 << max(int(n) - 1, 0).bit_length()  # the smallest power of two >= n
    if rule == "pow2":
        return min(power, limit)
    if rule == "octaves":  # (power / 2, power] in OCTAVE_STEPS steps
        rule = max(OCTAVE_MIN_STEP, power // (2 * OCTAVE_STEPS))
    return min(-(-int(n) // rule) * rule, limit)


def capacity(n_loss: int, length: int) -> int:
    """Loss positions a sequence of `length` makes room for: a power of two >= n_loss (at least 8), at most `length`."""
    return min(1 << (max(int(n_loss), MIN_CAPACITY) - 1).bit_length(), length)


def ladder(rule: int | str, limit: int) -> list[int]:
    """Every value `round_up(n, rule, limit)` takes for n in 1 .. limit, ascending."""
    return sorted({round_up(n, rule, limit) for n in _probe_points(rule, limit)})


def _probe_points(rule: int | str, limit: int) -> list[int]:
    if rule == "none":
        return [limit]
    if rule == "pow2":
        return [1 << k for k in range(limit.bit_length() + 1) if 1 << k <= limit] + [limit]
    if rule == "octaves":
        return list(range(1, limit + 1))
    return list(range(rule, limit + rule, rule))


class Plan(NamedTuple):
    """Where each row of a batch goes: `sequences[j]` lists the rows (in batch order) of sequence j."""

    sequences: tuple[tuple[int, ...], ...]
    length: int
    capacity: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """(R, L, K): sequences, their length, loss capacity; one compiled step per distinct shape."""
        return len(self.sequences), self.length, self.capacity


def plan(lengths: np.ndarray, loss_counts: np.ndarray, seq_len: int, layout: Layout) -> Plan:
    """The shape of a batch whose rows have `lengths` real tokens and `loss_counts` loss positions.

    Packing is longest-processing-time first: rows, longest first (ties by batch order), each go
    into the emptiest of R sequences; R is the smallest multiple of ``row_multiple`` whose
    sequences hold every row within `seq_len` tokens. Deterministic, and balanced, so the
    fullest sequence (which sets L) is as short as this greedy rule makes it.
    """
    lengths, loss_counts = np.asarray(lengths, int), np.asarray(loss_counts, int)
    if not layout.pack:
        sequences = tuple((i,) for i in range(len(lengths)))
        fill, loss = lengths, loss_counts
    else:
        sequences = _pack(lengths, seq_len, layout.row_multiple)
        fill = np.array([lengths[list(s)].sum() for s in sequences])
        loss = np.array([loss_counts[list(s)].sum() for s in sequences])
    length = round_up(max(int(fill.max(initial=0)), 1), layout.buckets, seq_len)
    return Plan(sequences, length, capacity(int(loss.max(initial=0)), length))


def _pack(lengths: np.ndarray, seq_len: int, multiple: int) -> tuple[tuple[int, ...], ...]:
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    needed = -(-int(lengths.sum()) // seq_len)  # sequences the tokens fill at the least
    n = max(1, -(-needed // multiple)) * multiple
    while True:
        bins, fill = [[] for _ in range(n)], [0] * n
        for i in order:
            j = min(range(n), key=lambda b: (fill[b], b))
            bins[j].append(i)
            fill[j] += int(lengths[i])
        if max(fill) <= seq_len:
            return tuple(tuple(sorted(b)) for b in bins)
        n += multiple


def shape_batch(batch: dict[str, np.ndarray], layout: Layout) -> dict[str, np.ndarray]:
    """A right-padded (B, T) batch -> the (R, L) batch a step computes on, with ``loss_index`` (R, K).

    Rows: the four arrays cut to L columns. Packed: ``input_ids``, ``targets``, ``loss_mask``,
    ``attention_mask`` (1 on tokens), ``segment_ids`` and ``position_ids``, each (R, L), pads 0.
    """
    attention = np.asarray(batch["attention_mask"]) > 0
    lengths = attention.sum(axis=1)
    if (attention.cumsum(axis=1) != np.minimum(np.arange(1, attention.shape[1] + 1), lengths[:, None])).any():
        raise ValueError("shape_batch expects right-padded rows (attention_mask: ones, then zeros)")
    loss_mask = np.asarray(batch["loss_mask"])
    p = plan(lengths, (loss_mask > 0).sum(axis=1), attention.shape[1], layout)
    if not layout.pack:
        out = {k: np.asarray(batch[k])[:, : p.length] for k in ("input_ids", "targets", "loss_mask", "attention_mask")}
    else:
        out = _packed(batch, lengths, p)
    out["loss_index"] = loss_index(out["loss_mask"], p.capacity)
    return out


def _packed(batch: dict, lengths: np.ndarray, p: Plan) -> dict[str, np.ndarray]:
    shape = (len(p.sequences), p.length)
    out = {k: np.zeros(shape, np.asarray(batch[k]).dtype) for k in ("input_ids", "targets", "loss_mask")}
    out |= {k: np.zeros(shape, np.int32) for k in ("attention_mask", "segment_ids", "position_ids")}
    for j, rows in enumerate(p.sequences):
        start = 0
        for i in rows:
            n = int(lengths[i])
            cut = slice(start, start + n)
            for k in ("input_ids", "targets", "loss_mask"):
                out[k][j, cut] = batch[k][i, :n]
            out["attention_mask"][j, cut] = 1
            out["segment_ids"][j, cut] = i + 1
            out["position_ids"][j, cut] = np.arange(n)
            start += n
    return out


def loss_index(loss_mask: np.ndarray, k: int) -> np.ndarray:
    """(R, K) int32: each row's positions with loss_mask > 0, in order, then a position without loss.

    >>> loss_index(np.array([[0, 1, 1, 0], [1, 0, 0, 1]]), 3).tolist()
    [[1, 2, 0], [0, 3, 1]]
    """
    carries = np.asarray(loss_mask) > 0
    if carries.sum(axis=1).max(initial=0) > k:
        raise ValueError(f"a row has more than {k} loss positions")
    # a stable sort puts the loss positions first, each group in position order
    order = np.argsort(~carries, axis=1, kind="stable")
    return order[:, :k].astype(np.int32)


class Shapes(NamedTuple):
    """What a run's batches will be: each shape (R, L, K) with its number of steps, and token counts."""

    shapes: Counter
    tokens: int  # real tokens (rows' lengths), over all steps
    computed: int  # R * L over all steps: what the steps compute on

    @property
    def padding(self) -> float:
        """The share of computed positions that are padding."""
        return 1 - self.tokens / max(self.computed, 1)


def run_shapes(data: TokenizedData, batch_size: int, seed: int, steps: range, layout: Layout) -> Shapes:
    """The shapes and padding of the train batches of `steps`, from row lengths alone (no batch is built)."""
    lengths = data.attention_mask.sum(axis=1)
    loss_counts = (data.loss_mask > 0).sum(axis=1)
    shapes, tokens, computed = Counter(), 0, 0
    for step in steps:
        rows = batch_indices(len(data), step, batch_size, seed)
        p = plan(lengths[rows], loss_counts[rows], data.seq_len, layout)
        shapes[p.shape] += 1
        tokens += int(lengths[rows].sum())
        computed += p.shape[0] * p.shape[1]
    return Shapes(shapes, tokens, computed)


def shape_bound(seq_len: int, batch_size: int, layout: Layout) -> int:
    """The most distinct (R, L, K) shapes any run with this layout can compile.

    L takes the values of ``ladder(buckets, seq_len)``; K a power of two from 8 up to L, or L;
    R is the batch size unpacked, else a multiple of ``row_multiple`` up to the batch size rounded up.
    """
    m = layout.row_multiple
    rows = 1 if not layout.pack else math.ceil(batch_size / m)
    lengths = ladder(layout.buckets, seq_len)
    return rows * sum(len({capacity(1 << k, n) for k in range(n.bit_length() + 1)}) for n in lengths)


def describe(layout: Layout, shapes: Shapes, bound: int) -> str:
    """For a run's first line: 'batches[ packed], padding 9% of 153,600 computed tokens, 3 step shapes (at most 45)'."""
    return (
        f"batches{' packed' if layout.pack else ''}, padding {shapes.padding:.0%} of {shapes.computed:,} computed "
        f"tokens, {len(shapes.shapes)} step shapes (at most {bound})"
    )
