"""``--member``: which adapters of a run the commands read, resolved in one place.

    --member K        member K of a population run
    --member 0,3      several members, in that order
    --member all      every member
    --member best     a finished search's winner (`jlora.training.records.checkpoint.best_member`)

A run or checkpoint without a population holds one adapter, which it gives whatever `--member`
says (so one `--member` can pick the members of the population runs among several sources).

`parse_member` is the argparse type (light: it imports nothing heavy, so ``jlora --help`` stays
fast); the one loader (`jlora.training.records.artifacts.member_indices`) turns a parsed value and
a checkpoint's meta into the indices to load. The commands that read one adapter (export,
diagnose) take `parse_one_member`: K or best.

>>> parse_member("3"), parse_member("0,3"), parse_member("all"), parse_member("best")
(3, (0, 3), 'all', 'best')
>>> member_text((0, -1))
'0,-1'
"""

from __future__ import annotations

import argparse

NAMES = ("all", "best")


def parse_member(text: str) -> int | tuple[int, ...] | str:
    """K, "K,L,...", or "all" (argparse's ``type=``)."""
    if text in NAMES:
        return text
    try:
        indices = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a member: give an index K, indices K,L,... or {' / '.join(NAMES)}"
        ) from None
    return indices[0] if len(indices) == 1 else indices


def parse_one_member(text: str) -> int | str:
    """K or "best" (argparse's ``type=`` where one adapter is read)."""
    spec = parse_member(text)
    if isinstance(spec, tuple) or spec == "all":
        raise argparse.ArgumentTypeError(f"{text!r}: this command reads one member: give an index K or best")
    return spec


def member_text(spec: int | tuple[int, ...] | str) -> str:
    """A parsed ``--member`` as it was written, for messages."""
    return ",".join(map(str, spec)) if isinstance(spec, tuple) else str(spec)
