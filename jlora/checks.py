"""Numbers a user gives, checked in one place: finite, of the right kind, in range, or one line naming the value.

Every command and research script checks its numeric options here (the decoding options through
`jlora.core.decoding.generate.check_decoding`), so ``nan``, ``inf`` and out-of-range values are
refused alike everywhere, before any work, with the option's name and the range it accepts:

>>> check_number("--temperature", 0.7, ">= 0")
0.7
>>> check_number("--temperature", float("nan"), ">= 0")
Traceback (most recent call last):
jlora.errors.ConfigError: --temperature must be a finite number >= 0, got nan
>>> check_number("--top-p", 1.5, "in (0, 1]")
Traceback (most recent call last):
jlora.errors.ConfigError: --top-p must be a finite number in (0, 1], got 1.5
>>> check_number("--rounds", 0, ">= 1", integer=True)
Traceback (most recent call last):
jlora.errors.ConfigError: --rounds must be an integer >= 1, got 0
"""

from __future__ import annotations

import math
import operator
import re
from typing import Any

from jlora.errors import ConfigError, JloraError

_BOUND = re.compile(r"^(>=|>|<=|<)\s*(\S+)$")
_INTERVAL = re.compile(r"^in\s*([\[(])\s*([^,\s]+)\s*,\s*([^\]\s)]+)\s*([\])])$")
_COMPARE = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def within(value: float, bounds: str) -> bool:
    """Whether `value` lies within `bounds`: "" (anything), "> 0", ">= 1", "< 1", "in (0, 1]", "in [0, 1)".

    >>> within(0.0, "> 0"), within(1.0, "in (0, 1]"), within(0.5, "")
    (False, True, True)
    """
    if not bounds:
        return True
    bound = _BOUND.match(bounds)
    if bound:
        return _COMPARE[bound.group(1)](value, float(bound.group(2)))
    interval = _INTERVAL.match(bounds)
    if not interval:
        raise ValueError(f"bounds must read like '> 0' or 'in (0, 1]', got {bounds!r}")
    opening, low, high, closing = interval.groups()
    above = value >= float(low) if opening == "[" else value > float(low)
    below = value <= float(high) if closing == "]" else value < float(high)
    return above and below


def check_number(
    name: str, value: Any, bounds: str = "", *, integer: bool = False, error: type[JloraError] = ConfigError
) -> Any:
    """`value` if it is a finite number (an integer if `integer`; never a bool) within `bounds` (see `within`);
    else `error` (one line: `name`, what is valid, the value given)."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if integer:
        ok = number and float(value).is_integer() and within(value, bounds)
    else:
        ok = number and math.isfinite(value) and within(value, bounds)
    if not ok:
        kind = "an integer" if integer else "a finite number"
        raise error(f"{name} must be {kind}{' ' + bounds if bounds else ''}, got {value!r}")
    return int(value) if integer else value
