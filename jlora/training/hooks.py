"""The hooks of `jlora train`: what a run does between updates besides updating.

    MetricsLog   each update's metrics, fetched in windows: metrics.jsonl, TensorBoard, progress bar
    evaluation   validation loss, perplexity and exact match            (a closure built in `train`)
    checkpoint   the adapter and optimizer state, with the run's meta  (a closure built in `train`)

Each is called by `jlora.training.loop.run_hooks` with a `StepInfo`; they run in the order the
run lists them, so the log (which stops a run whose loss is not finite) runs before a
checkpoint could save a bad state.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import jax
import numpy as np

from jlora.errors import NonFiniteError
from jlora.training.loop import StepInfo
from jlora.training.metrics import MetricsWriter


class MetricsLog:
    """Keeps each update's metrics on the device and writes them every `every` updates.

    Fetching once per window keeps the host from waiting on each step. The window is also
    written at every `boundary(step)` (an evaluation or a checkpoint), so rows stay in step order
    and a non-finite loss is caught before a checkpoint. The last row written is `last`.
    """

    def __init__(
        self,
        writer: MetricsWriter,
        *,
        every: int,
        boundary: Callable[[int], bool],
        pmapped: bool,
        newest_checkpoint: Callable[[], int | None],
        bar=None,
    ):
        self.writer, self.every, self.boundary, self.pmapped = writer, every, boundary, pmapped
        self.newest_checkpoint, self.bar = newest_checkpoint, bar
        self.pending: list[tuple[int, dict]] = []
        self.tokens, self.clock = 0, time.perf_counter()
        self.last: dict = {}

    def __call__(self, info: StepInfo) -> None:
        self.pending.append((info.step, info.metrics))
        batch = info.batch  # tokens/s counts real tokens, not the padding a batch is computed with
        self.tokens += int(np.sum(batch["attention_mask"]) if "attention_mask" in batch else batch["input_ids"].size)
        if info.step % self.every == 0 or self.boundary(info.step) or info.last:
            self.flush()

    def flush(self) -> None:
        rows = fetch_rows(self.pending, self.pmapped)
        self.pending = []
        for row in rows:
            if not math.isfinite(row["loss"]):
                raise NonFiniteError(
                    f"loss is {row['loss']} at step {row['step']}; stopped without saving this state "
                    f"(newest checkpoint: step {self.newest_checkpoint()})"
                )
        rows[-1]["tokens_per_s"] = self.tokens / (time.perf_counter() - self.clock)
        for row in rows:
            self.writer.write(row)
        self.last = rows[-1]
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{self.last['loss']:.4f}", lr=f"{self.last['lr']:.2e}", tok_s=f"{self.last['tokens_per_s']:.0f}"
            )
        self.tokens, self.clock = 0, time.perf_counter()


def fetch_rows(pending: list[tuple[int, dict]], pmapped: bool) -> list[dict]:
    """Device metrics -> host rows {"step", "loss", ...} (one transfer for the whole window)."""
    values = jax.device_get([m for _, m in pending])
    rows = []
    for (step, _), m in zip(pending, values, strict=True):
        row = {"step": step}
        for k, v in m.items():
            v = np.asarray(v)
            row[k] = float(v.reshape(-1)[0] if pmapped else v)
        rows.append(row)
    return rows
