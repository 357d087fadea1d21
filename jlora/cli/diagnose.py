"""`jlora diagnose RUN_DIR [--against RUN_DIR2] [--out DIR]`: the spectrum and intruder dimensions of a run's updates.

The figures are `jlora.research.diagnose`'s; this handler prints the table and writes the JSON and plots.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jlora.errors import UsageError
from jlora.exchange.folders import check_out_dir
from jlora.research.diagnose import compare, diagnose, format_table, write_plots
from jlora.training.records.checkpoint import resolve_member


def diagnose_command(args: argparse.Namespace) -> int:
    """The `jlora diagnose` handler: the table on stdout, JSON and plots under --out."""
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"no such run directory {run_dir}")
    if args.against and not Path(args.against).is_dir():
        raise UsageError(f"no such run directory {args.against}")
    if args.intruder_k < 1 or not 0 < args.intruder_epsilon <= 1:
        raise UsageError(
            f"--intruder-k must be >= 1 and --intruder-epsilon in (0, 1], "
            f"got {args.intruder_k} and {args.intruder_epsilon}"
        )
    out = check_out_dir(Path(args.out) if args.out else run_dir / "diagnose")  # now, not after the figures
    member = resolve_member(run_dir, args.member)  # "best": a search's winner
    report = diagnose(run_dir, step=args.step, member=member, k=args.intruder_k, epsilon=args.intruder_epsilon)
    if args.against:
        against_member = resolve_member(args.against, args.against_member)
        report["against"] = compare(run_dir, args.against, step=args.step, member=member, against_member=against_member)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnose.json").write_text(json.dumps(report, indent=1) + "\n")
    written = write_plots(report, out)
    print(format_table(report))
    print(f"wrote {out / 'diagnose.json'}, " + ", ".join(str(p) for p in written))
    return 0
