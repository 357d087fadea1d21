"""The training loop: a generator of steps and the hooks that watch it.

    steps = train_steps(step, state, batch_for, rng, start=0, stop=100)   # yields StepInfo after each update
    run_hooks(steps, [Hook(log, every=1), Hook(evaluate, every=50), Hook(save, every=100)])

The loop only steps and calls hooks; everything a run does besides updating (logging,
evaluation, checkpoints, telemetry) is a hook, called in list order after every update whose
number it divides, and after the last one. A hook sees the state after the update, before the
next update donates it.

>>> calls = []
>>> counter = lambda state, batch, rng: (state + batch, {"loss": state})
>>> last = run_hooks(train_steps(counter, 0, lambda step: 1, None, start=0, stop=5),
...                  [Hook(lambda info: calls.append(info.step), every=2)])
>>> calls, last.state
([2, 4, 5], 5)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple


class StepInfo(NamedTuple):
    """One update as hooks see it.

    Attributes:
      step: updates done (1 after the first).
      state: the train state after the update (replicated under pmap).
      metrics: the update's metrics, still on the device (fetching them is the hook's choice).
      batch: the host batch the update read.
      last: whether this is the loop's final update.
    """

    step: int
    state: Any
    metrics: dict
    batch: dict
    last: bool


class Hook(NamedTuple):
    """``run(info)`` after every update whose number `every` divides, and after the last one."""

    run: Callable[[StepInfo], Any]
    every: int = 1

    def due(self, info: StepInfo) -> bool:
        return info.step % self.every == 0 or info.last


def train_steps(
    step: Callable, state: Any, batch_for: Callable[[int], dict], rng: Any, *, start: int, stop: int
) -> Iterator[StepInfo]:
    """Updates `start` .. `stop` - 1 of a run: ``state, metrics = step(state, batch_for(i), rng)``.

    `batch_for(i)` is the batch of update i (a pure function of i, so a resumed run sees the
    same batches); the step folds the update number into `rng` itself.
    """
    for i in range(start, stop):
        batch = batch_for(i)
        state, metrics = step(state, batch, rng)
        yield StepInfo(i + 1, state, metrics, batch, i + 1 == stop)


def run_hooks(steps: Iterable[StepInfo], hooks: Sequence[Hook]) -> StepInfo | None:
    """Drive `steps`, calling each due hook in order after each update; returns the last StepInfo."""
    info = None
    for info in steps:
        for hook in hooks:
            if hook.due(info):
                hook.run(info)
    return info
