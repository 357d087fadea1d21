"""A population's members from the run config's ``population:`` section.

A run with a ``population:`` section trains K adapters at once on its base and batches
(`jlora.core.update.population`). Each member is the run's own settings with a few replaced: its rank
``r``, ``alpha`` (a number, or a multiple of the member's r: ``2r``), ``rslora``, ``seed`` (its
adapter seed: A's initialisation and its dropout keys, as a solo run's ``adapter_seed``), ``lr``
and ``loraplus_ratio``. List them, or give a grid whose product is the population::

    population:                          population:
      members:                             grid:
        - {r: 4, alpha: 8}                   r: [1, 2, 4, 8]
        - {r: 8, alpha: 16, lr: 1e-3}        alpha: [2r, 16]      # 8 members: r=1 alpha=2, r=1 alpha=16, ...
        - {r: 8, seed: 1}                    seed: [0, 1]         # 16

Members that come out the same (r=8 with alpha=2r and with alpha=16) are trained once. Each
member's name lists what was given for it (``r=4,alpha=8``).

>>> cfg = PopulationConfig(grid={"r": [1, 4], "alpha": ["2r", 16]})
>>> [m.name for m in cfg.resolve(LoraConfig(), lr=1e-3, loraplus_ratio=None, seed=0)]
['r=1,alpha=2', 'r=1,alpha=16', 'r=4,alpha=8', 'r=4,alpha=16']
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import re
from typing import Any

from jlora.checks import check_number
from jlora.core.lora.config import LoraConfig
from jlora.core.update.population import Member
from jlora.errors import ConfigError

KEYS = ("r", "alpha", "rslora", "seed", "lr", "loraplus_ratio")
_TIMES_R = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)?\s*\*?\s*r\s*$")


@dataclasses.dataclass(frozen=True)
class PopulationConfig:
    """The ``population:`` section: `members` (a list of mappings) or a `grid` (a mapping of lists)."""

    members: tuple[dict, ...] = ()  # the members: mappings of r, alpha, rslora, seed, lr, loraplus_ratio
    grid: dict = dataclasses.field(default_factory=dict)  # or lists of values per key: a member per combination

    def settings(self) -> list[dict]:
        """Each member's given keys, in order: the listed members, or the grid's product."""
        if bool(self.members) == bool(self.grid):
            raise ConfigError("population: give either members (a list) or grid (lists of values), not both")
        if self.members:
            return [dict(m) for m in self.members]
        for key, values in self.grid.items():
            if not isinstance(values, list | tuple) or not values:
                raise ConfigError(f"population.grid.{key} must be a non-empty list, got {values!r}")
        return [dict(zip(self.grid, values)) for values in itertools.product(*self.grid.values())]

    def resolve(self, lora: LoraConfig, *, lr: float, loraplus_ratio: float | None, seed: int) -> list[Member]:
        """The members, each the given defaults (the run's) with its own keys replaced; duplicates once."""
        specs, seen = [], set()
        for i, given in enumerate(self.settings()):
            where = f"population member {i} ({given})"
            unknown = sorted(set(given) - set(KEYS))
            if unknown:
                raise ConfigError(f"{where}: unknown key(s) {unknown}; valid: {', '.join(KEYS)}")
            spec = _member(given, lora, lr, loraplus_ratio, seed, where)
            key = (spec.lora, spec.lr, spec.loraplus_ratio, spec.seed)
            if key not in seen:
                seen.add(key)
                specs.append(spec)
        return specs


def _member(given: dict, lora: LoraConfig, lr: float, ratio: float | None, seed: int, where: str) -> Member:
    r = given.get("r", lora.r)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ConfigError(f"{where}: r must be a positive integer, got {r!r}")
    alpha = _alpha(given.get("alpha", lora.alpha), r, where)
    rslora = given.get("rslora", lora.rslora)
    if not isinstance(rslora, bool):
        raise ConfigError(f"{where}: rslora must be true or false, got {rslora!r}")
    member_seed = given.get("seed", seed)
    if not isinstance(member_seed, int) or isinstance(member_seed, bool):
        raise ConfigError(f"{where}: seed must be an integer, got {member_seed!r}")
    member_lr = _number(given.get("lr", lr), "lr", where)
    member_ratio = given.get("loraplus_ratio", ratio)
    member_ratio = None if member_ratio is None else _number(member_ratio, "loraplus_ratio", where)
    try:
        member_lora = lora.replace(r=r, alpha=alpha, rslora=rslora)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    resolved = {"r": r, "alpha": alpha, "rslora": rslora, "seed": member_seed, "lr": member_lr}
    resolved["loraplus_ratio"] = member_ratio
    name = ",".join(f"{k}={_show(resolved[k])}" for k in given) or "run"
    return Member(member_lora, member_lr, member_ratio, member_seed, name)


def _alpha(value: Any, r: int, where: str) -> float:
    """A number, or a multiple of r written ``2r`` / ``r`` / ``0.5r``."""
    if isinstance(value, str):
        match = _TIMES_R.match(value)
        if not match:
            raise ConfigError(f"{where}: alpha must be a number or a multiple of r like 2r, got {value!r}")
        return float(match.group(1) or 1.0) * r
    return _number(value, "alpha", where)


def _number(value: Any, name: str, where: str) -> float:
    """A member's lr, alpha or LoRA+ ratio: finite and > 0, as the run's own must be (YAML reads 1e-3 as text)."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    return float(check_number(f"{where}: {name}", value, "> 0"))


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
