"""The run directory: one `jlora train` at a time, its records written by one process.

    with hold_run_dir(run_dir):      # RunDirError: a file, under a file, read-only, or in use
        ... train ...                # the lock is released when the block ends (or the process dies)
    is_primary()                     # True on process 0: the one that writes config, metrics, summary

The lock is an advisory ``flock`` on the directory itself, so it leaves no file behind and the
kernel releases it when its holder exits, however it exits (SIGKILL included): a second
`jlora train` on the same RUN_DIR is refused while the first runs, and a crashed run never
leaves a stale lock. In a multi-host run only process 0 takes the lock and the others learn
the outcome from it (every process of the run shares the directory; Orbax needs each one to
take part in a save, but the run's records are written once, by process 0).

A directory `hold_run_dir` creates for a run that then fails before writing anything is
removed again (only if still empty), so a failed command leaves the disk as it found it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np

from jlora.errors import RunDirError
from jlora.exchange.folders import made_dirs, writable

RECORDS = ("checkpoints", "tb", "config.yaml", "metrics.jsonl", "summary.json")  # what a run writes in RUN_DIR


def is_primary() -> bool:
    """Whether this process writes the run's records (config.yaml, metrics, TensorBoard, summary)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process of a multi-host run gets here (nothing to wait for on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def check_run_dir(run_dir: Path) -> None:
    """Refuse a RUN_DIR that is a file, lies under a file, cannot be written, or is in use (one line)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--out {run_dir} is a file, not a directory; choose a directory")
    existing = next((p for p in (run_dir, *run_dir.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise RunDirError(f"--out {run_dir} lies under {existing}, which is a file; choose a directory")
    if not writable(existing):
        raise RunDirError(f"{existing} is not writable; choose a writable --out for {run_dir}")
    if existing == run_dir:  # what a resumed run writes to: writable now, not found so at its first checkpoint
        for name in RECORDS:
            path = run_dir / name
            if path.exists() and not (writable(path) if path.is_dir() else os.access(path, os.W_OK)):
                raise RunDirError(f"{path} is not writable; make it writable to resume, or choose another --out")
    if existing == run_dir and is_primary():  # in use: say so now, not after loading a model
        os.close(_lock(run_dir))


def _lock(run_dir: Path) -> int:
    """An exclusive flock on `run_dir` (an open fd); RunDirError if another process holds it."""
    fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise RunDirError(
                f"{run_dir} is in use by another `jlora train`; wait for it to finish or choose another --out"
            ) from None
        raise RunDirError(f"cannot lock {run_dir} ({e.strerror})") from None
    return fd


def _agree(ok: bool) -> bool:
    """Process 0's `ok`, on every process of a multi-host run (as is, on one process)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


@contextlib.contextmanager
def hold_run_dir(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Create (if needed) and lock `run_dir` for the duration of the block; see the module doc."""
    run_dir = Path(run_dir)
    with contextlib.ExitStack() as stack:
        failure = None
        if is_primary():
            try:
                check_run_dir(run_dir)
                stack.enter_context(made_dirs(run_dir, RunDirError))
                fd = _lock(run_dir)
                stack.callback(os.close, fd)
            except RunDirError as e:
                failure = e
        if not _agree(failure is None):
            raise failure or RunDirError(f"process 0 of this run could not take {run_dir}")
        yield run_dir
