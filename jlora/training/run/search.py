"""Successive halving over a population: at each rung the best 1 / eta go on, decided from logged metrics.

A run with a ``population:`` and a ``search:`` section trains all members together and prunes as it goes::

    search:
      eta: 2            # at each rung keep the best ceil(n / eta) members
      rung_every: 100   # steps between rungs; the first rung is at step rung_every
      metric: val_loss  # what ranks them: val_loss, val_ppl (lower is better), exact_match (higher)

    step      0 ───────── 100 ───────── 200 ───────── 300 ───────── 400 = steps
    members  30            15             8             4            best
                          rung          rung          rung          final ranking

At a rung every live member is evaluated (the run's evaluation, logged to metrics.jsonl like any
other), `decide` ranks them by the metric, ties broken by member index, and keeps the best
ceil(n / eta); the others stop there. The rule is a pure function of the logged rows, kept apart
from the loop as Ray Tune's ASHA scheduler keeps its rule apart from its trials: `Search` is the
bookkeeping the loop consults (who is alive, the rungs so far, the final ranking), and what each
checkpoint's meta records, so a resumed search takes up exactly where it stopped. `search_steps`
runs the loop segment by segment: after a rung's hooks, the population shrinks to its survivors
(`jlora.training.run.population.survivors`), so a search compiles once per population size, and
nothing about a survivor depends on who was pruned beside it.

>>> decide({0: 2.5, 1: 2.1, 2: 2.1, 3: 3.0}, alive=[0, 1, 2, 3], eta=2)   # 1 and 2 tie: index order
([1, 2], [0, 3])
>>> rung_steps(100, 400)
[100, 200, 300]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence

from jlora.errors import ConfigError
from jlora.training.run.loop import StepInfo, train_steps

METRICS = {"val_loss": False, "val_ppl": False, "exact_match": True}  # name: higher is better


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """The ``search:`` section: successive halving over the run's population (module doc)."""

    eta: int = 2  # at each rung the best ceil(n / eta) live members go on (>= 2)
    rung_every: int = 100  # steps between rungs; the first rung is at step rung_every (1 .. steps - 1)
    metric: str = "val_loss"  # what ranks the members: val_loss, val_ppl (lower is better), exact_match (higher)

    @property
    def higher_is_better(self) -> bool:
        return METRICS[self.metric]

    def check(self, cfg) -> None:
        """A ConfigError (one line) for a search `cfg` (the RunConfig) cannot run."""
        if cfg.population is None:
            raise ConfigError(
                "search: successive halving prunes a population; add a population: section (members or grid)"
            )
        if self.eta < 2:
            raise ConfigError(f"search.eta must be >= 2 (each rung keeps ceil(n / eta) members), got {self.eta}")
        if not 1 <= self.rung_every < cfg.steps:
            raise ConfigError(
                f"search.rung_every must be in 1..{cfg.steps - 1} (steps - 1; the first rung is at step "
                f"rung_every), got {self.rung_every}"
            )
        if self.metric not in METRICS:
            raise ConfigError(f"search.metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if not cfg.data.validation:
            raise ConfigError(f"search.metric={self.metric} needs a validation set; set data.validation")
        if self.metric == "exact_match" and not cfg.exact_match:
            raise ConfigError("search.metric=exact_match needs exact_match > 0 (validation pairs answered greedily)")


def rung_steps(rung_every: int, steps: int) -> list[int]:
    """The steps of a search's rungs: every `rung_every` steps, before the last step (which ranks the rest)."""
    return list(range(rung_every, steps, rung_every))


def ranking(values: Mapping[int, float], alive: Sequence[int], higher_is_better: bool = False) -> list[int]:
    """`alive`'s members best first by ``values[k]``; ties by index, a non-finite value last.

    >>> ranking({0: 0.2, 1: 0.5, 2: float("nan")}, [0, 1, 2], higher_is_better=True)
    [1, 0, 2]
    """
    missing = [k for k in alive if k not in values]
    if missing:
        raise ValueError(f"no metric for member(s) {missing} at this rung")
    sign = -1.0 if higher_is_better else 1.0
    return sorted(alive, key=lambda k: (not math.isfinite(values[k]), sign * values[k], k))


def decide(
    metric_by_member: Mapping[int, float], alive: Sequence[int], eta: int, higher_is_better: bool = False
) -> tuple[list[int], list[int]]:
    """(kept, pruned) at a rung, each in index order: the best ceil(n / eta) of the n `alive` members go on."""
    ranked = ranking(metric_by_member, alive, higher_is_better)
    n_kept = math.ceil(len(ranked) / eta)
    return sorted(ranked[:n_kept]), sorted(ranked[n_kept:])


def rung_values(rows: Sequence[Mapping], step: int, metric: str) -> dict[int, float]:
    """{member: metric} from evaluation rows (as metrics.jsonl holds them) at `step`."""
    return {row["member"]: row[metric] for row in rows if row.get("step") == step and metric in row}


class Search:
    """A search's bookkeeping: the live members, the rungs decided, the final ranking.

    Everything here is JSON, recorded in each checkpoint's meta (`meta`) and summary.json (`summary`).
    `rungs` are ``{"step", "kept", "pruned", "ranking", <metric>: values in ranking order}``.
    """

    def __init__(self, cfg: SearchConfig, steps: int, n_members: int):
        self.cfg, self.steps, self.n_members = cfg, steps, n_members
        self.rung_steps = rung_steps(cfg.rung_every, steps)
        self.alive: list[int] = list(range(n_members))
        self.rungs: list[dict] = []
        self.final: dict | None = None

    @classmethod
    def resumed(
        cls, cfg: SearchConfig, steps: int, n_members: int, meta: Mapping | None, start: int, rows: Sequence[Mapping]
    ) -> Search:
        """The search as the checkpoint of step `start` left it (`meta`: its meta; None: a fresh start).

        A run resumed with more `steps` may find a rung at `start` that its checkpoint, then the last
        step, did not decide: it is decided now from the rows logged at `start` (`rows`, metrics.jsonl's).
        """
        search = cls(cfg, steps, n_members)
        saved = (meta or {}).get("search")
        if saved:
            search.alive, search.rungs = list(saved["alive"]), [dict(r) for r in saved["rungs"]]
            search.final = saved.get("final") if start == steps else None
        if search.prunes_at(start) and all(r["step"] != start for r in search.rungs):
            search.rung(start, rows)
        return search

    def prunes_at(self, step: int) -> bool:
        """Whether `step` is a rung that can still prune: one of `rung_steps`, with more than one member alive
        (a lone survivor goes on without evaluations at the rungs left, nor a new stage of the population)."""
        return step in self.rung_steps and len(self.alive) > 1

    @property
    def best(self) -> int | None:
        """The winner: first in the final ranking (None before the last step)."""
        return None if self.final is None else self.final["ranking"][0]

    def rung(self, step: int, rows: Sequence[Mapping]) -> dict:
        """Decide the rung at `step` from the evaluation rows logged there; the pruned leave `alive`."""
        values = rung_values(rows, step, self.cfg.metric)
        kept, pruned = decide(values, self.alive, self.cfg.eta, self.cfg.higher_is_better)
        ranked = ranking(values, self.alive, self.cfg.higher_is_better)
        record = {"step": step, "kept": kept, "pruned": pruned, "ranking": ranked}
        record[self.cfg.metric] = [values[k] for k in ranked]
        self.rungs.append(record)
        self.alive = kept
        return record

    def finish(self, step: int, rows: Sequence[Mapping]) -> dict:
        """Rank the members left at the last step: the first is the search's best."""
        values = rung_values(rows, step, self.cfg.metric)
        ranked = ranking(values, self.alive, self.cfg.higher_is_better)
        self.final = {"step": step, "ranking": ranked, self.cfg.metric: [values[k] for k in ranked]}
        return self.final

    def steps_trained(self, step: int) -> list[int]:
        """Each member's updates at `step`: up to the rung that pruned it, else `step`."""
        pruned_at = {k: r["step"] for r in self.rungs for k in r["pruned"]}
        return [pruned_at.get(k, step) for k in range(self.n_members)]

    def meta(self) -> dict:
        """The checkpoint meta's ``search`` entry."""
        return {"search": {"alive": list(self.alive), "rungs": self.rungs, "final": self.final, "best": self.best}}

    def summary(self, step: int) -> dict:
        """summary.json's ``search``: the settings, rungs, final ranking and best, and the work each member got."""
        trained = self.steps_trained(step)
        return {
            **dataclasses.asdict(self.cfg),
            "higher_is_better": self.cfg.higher_is_better,
            "rungs": self.rungs,
            "final": self.final,
            "best": self.best,
            "alive": list(self.alive),
            "steps_trained": trained,
            "member_steps": sum(trained),
        }

    def describe(self, record: Mapping, names: Sequence[str]) -> str:
        """One line on a rung (or the final ranking) for the log."""
        metric = self.cfg.metric
        shown = ", ".join(f"{k} [{names[k]}] {v:.4g}" for k, v in zip(record["ranking"], record[metric]))
        if "kept" not in record:
            return f"search: best at step {record['step']}: member {record['ranking'][0]} ({metric}: {shown})"
        return (
            f"search: rung at step {record['step']}: {len(record['kept'])} of "
            f"{len(record['kept']) + len(record['pruned'])} go on ({metric}: {shown})"
        )


def search_steps(
    step: Callable,
    state,
    batch_for: Callable[[int], dict],
    rng,
    *,
    start: int,
    stop: int,
    rungs: Sequence[int],
    restage: Callable[[object, int], tuple[Callable, object, object]],
    stop_requested: Callable[[int], bool] = lambda step: False,
) -> Iterator[StepInfo]:
    """`train_steps` from `start` to `stop` in segments that end at the `rungs` between them.

    After the hooks have seen a rung's update (and decided the rung), ``restage(state, rung)`` gives
    the step, state and dropout keys of the survivors, which the next segment steps (the same ones
    where the rung pruned nobody). Only the update at `stop` (or one stopped on request, also
    checked at a rung) is `last`.
    """
    edges = [start, *(s for s in rungs if start < s < stop), stop]
    for i, (a, b) in enumerate(zip(edges, edges[1:])):
        if i:
            step, state, rng = restage(state, a)
        info = None
        for info in train_steps(step, state, batch_for, rng, start=a, stop=b, stop_requested=stop_requested):
            if info.step == b < stop:  # the segment's end, a rung: stop here only if asked to
                stopped = stop_requested(b)
                info = info._replace(last=stopped, interrupted=stopped)
            yield info
            if info.last:
                return
        if info is None:
            return
        state = info.state
