"""Run metrics: ``RUN_DIR/metrics.jsonl`` (one JSON object a line) and TensorBoard event files.

Each row has a ``step``; training rows carry ``loss``, evaluation rows ``val_loss``. A resumed
run first drops the rows past the step it resumes from, in metrics.jsonl and in the TensorBoard
event file alike, so both read as one run: each step once, whatever was interrupted.

In a multi-host run every process computes the same rows; only the primary one (process 0)
writes them, so each step is recorded once.

A population run (several adapters trained at once) writes one stream per member: each of its
rows carries a ``member`` index, and member k's numbers go to their own TensorBoard run,
``RUN_DIR/tb/<k>-<name>``, so TensorBoard draws the members side by side.

TensorBoard files need tensorboardX (a dependency of jlora); where it is missing (a fixed image
without it), the run says so once and writes metrics.jsonl alone, which holds every number.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Mapping
from pathlib import Path

from jlora.training.records.tensorboard import ScalarWriter


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All rows of ``RUN_DIR/metrics.jsonl``, in order (a last line a killed run left unfinished is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().split("\n")[:-1]  # only lines with their newline are whole
    return [json.loads(line) for line in lines if line.strip()]


class MetricsWriter:
    """Appends rows to metrics.jsonl and mirrors their numbers to TensorBoard (``RUN_DIR/tb``).

    `truncate_after`: the step a run resumes from (0: a fresh start); rows past it are dropped
    first. `primary`: False on the processes of a multi-host run that do not write (rows are
    accepted and discarded). `members`: a population's member names; a row with a ``member``
    index k then goes to TensorBoard run ``tb/<k>-<name>``.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        truncate_after: int | None = None,
        primary: bool = True,
        members: list[str] | None = None,
    ):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = self._tb = None
        if not primary:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after is not None and self.path.exists():  # rows past the resumed step are replayed
            kept = [r for r in read_metrics(run_dir) if r["step"] <= truncate_after] if truncate_after else []
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a")
        self._tb = {}
        if importlib.util.find_spec("tensorboardX") is not None:
            self._tb = member_writers(Path(run_dir) / "tb", members, truncate_after)
        else:
            print(
                "jlora: tensorboardX is not installed: no TensorBoard files (metrics.jsonl has every number)",
                file=sys.stderr,
            )

    def write(self, row: Mapping) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(dict(row)) + "\n")
        self._file.flush()
        numbers = {k: float(v) for k, v in row.items() if k not in ("step", "member") and isinstance(v, int | float)}
        if self._tb:
            self._tb[row.get("member")].scalars(int(row["step"]), numbers)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            for tb in self._tb.values():
                tb.close()


def member_writers(
    tb_dir: Path, members: list[str] | None, truncate_after: int | None = None
) -> dict[int | None, ScalarWriter]:
    """{None: one writer in `tb_dir`} for a single run; {k: a writer in ``tb_dir/<k>-<name>``} per member."""
    if members is None:
        return {None: ScalarWriter(tb_dir, truncate_after=truncate_after)}
    return {k: ScalarWriter(tb_dir / f"{k}-{name}", truncate_after=truncate_after) for k, name in enumerate(members)}
