"""The training loop: a generator of steps and the hooks that watch it.

    steps = train_steps(step, state, batch_for, rng, start=0, stop=100)   # yields StepInfo after each update
    run_hooks(steps, [Hook(log, every=1), Hook(evaluate, every=50), Hook(save, every=100)])

The loop only steps and calls hooks; everything a run does besides updating (logging,
evaluation, checkpoints, telemetry) is a hook, called in list order after every update whose
number it divides, and after the last one. A hook sees the state after the update, before the
next update donates it. A loop asked to stop (`stop(step)` true, e.g. after Ctrl-C) makes the
current update its last, marked `interrupted`: the hooks that run at the end run then, except
those registered with ``at_interrupt=False`` (an evaluation need not delay a stop).

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
      state: the train state after the update (on the step's device mesh).
      metrics: the update's metrics, still on the device (fetching them is the hook's choice).
      batch: the host batch the update read.
      last: whether this is the loop's final update.
      interrupted: whether it is final because the loop was asked to stop.
    """

    step: int
    state: Any
    metrics: dict
    batch: dict
    last: bool
    interrupted: bool = False


class Hook(NamedTuple):
    """``run(info)`` after every update whose number `every` divides, and after the last one
    (after an interrupted last one too, unless `at_interrupt` is False)."""

    run: Callable[[StepInfo], Any]
    every: int = 1
    at_interrupt: bool = True

    def due(self, info: StepInfo) -> bool:
        return info.step % self.every == 0 or (info.last and (self.at_interrupt or not info.interrupted))


def train_steps(
    step: Callable,
    state: Any,
    batch_for: Callable[[int], dict],
    rng: Any,
    *,
    start: int,
    stop: int,
    stop_requested: Callable[[int], bool] = lambda step: False,
) -> Iterator[StepInfo]:
    """Updates `start` .. `stop` - 1 of a run: ``state, metrics = step(state, batch_for(i), rng)``.

    `batch_for(i)` is the batch of update i (a pure function of i, so a resumed run sees the
    same batches); the step folds the update number into `rng` itself. After each update,
    ``stop_requested(step)`` true ends the loop there (that update is `last` and `interrupted`).

    >>> counter = lambda state, batch, rng: (state + 1, {})
    >>> [(i.step, i.last, i.interrupted) for i in train_steps(counter, 0, lambda s: None, None, start=0, stop=9,
    ...                                                       stop_requested=lambda step: step == 2)]
    [(1, False, False), (2, True, True)]
    """
    for i in range(start, stop):
        batch = batch_for(i)
        state, metrics = step(state, batch, rng)
        interrupted = i + 1 < stop and stop_requested(i + 1)
        yield StepInfo(i + 1, state, metrics, batch, i + 1 == stop or interrupted, interrupted)
        if interrupted:
            return


def run_hooks(steps: Iterable[StepInfo], hooks: Sequence[Hook]) -> StepInfo | None:
    """Drive `steps`, calling each due hook in order after each update; returns the last StepInfo."""
    info = None
    for info in steps:
        for hook in hooks:
            if hook.due(info):
                hook.run(info)
    return info
