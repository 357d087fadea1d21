"""Output folders, written whole or not at all, by one writer: every folder a command creates goes through here.

    check_new_folder(out)            # at start-up: nothing in the way, the place writable (one line if not)
    with new_folder(out) as tmp:     # a hidden sibling, OUT/../.OUT.tmp-<pid>, locked while it is written
        write_peft(tmp, ...)         # the writers fill a folder they are given; they make no folder of their own
        write_merged(tmp / "base", ...)
                                     # the block succeeded: tmp is renamed to OUT; it failed: tmp is removed

A folder holds one writer's files: `save_peft` and `save_merged` are ``new_folder`` around
``write_peft`` / ``write_merged``, and a command that writes both (an export or a combination on a
random base) opens one ``new_folder`` and calls both writers into it, so no temporary folder is ever
made inside another. A writer killed outright (SIGKILL, a power cut) leaves its hidden folder
behind; the next writer of the same OUT removes it. Each writer holds an ``flock`` on its folder
while it writes (the kernel releases it however the writer ends), so a leftover is told from a
live writer's folder without trusting process ids.

A write the file system refuses (a full disk, a read-only or vanished folder) is a one-line error
naming OUT and the reason, with nothing left behind (`write_failure` reads the reason from the
OS's error or from a library's message about it). `check_out_dir` is the start-up check for a folder
a command writes files into (diagnose, evaluate, the research scripts), made only when it writes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from jlora.errors import CheckpointError, JloraError, UsageError

TMP = ".tmp-"  # a writer's folder: ".<name>.tmp-<pid>" beside <name>
# The errors of a file system that cannot take a write (the OS's, or named in a library's message).
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG)


def write_failure(error: BaseException) -> str | None:
    """Why a write failed, if the file system refused it (the OS's reason); None for any other error.

    Libraries report the same failures in their own words (safetensors, tensorstore under Orbax);
    their message names the OS's reason, which is what is returned.

    >>> write_failure(OSError(errno.ENOSPC, "No space left on device"))
    'No space left on device'
    >>> write_failure(Exception("Error while serializing: I/O error: Read-only file system (os error 30)"))
    'Read-only file system'
    >>> write_failure(ValueError("a shape does not match")) is None
    True
    """
    if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
        return error.strerror or os.strerror(error.errno)
    text = str(error)
    for code in WRITE_ERRNOS:
        if os.strerror(code) in text:
            return os.strerror(code)
    cause = error.__cause__ or error.__context__
    return write_failure(cause) if cause is not None else None


def writable(path: Path) -> bool:
    """Whether files can be made in the existing folder `path` (a read-only mount says no even to root)."""
    return os.access(path, os.W_OK | os.X_OK)


def check_out_dir(out_dir: str | os.PathLike, *, flag: str = "--out", error: type[JloraError] = UsageError) -> Path:
    """`out_dir` if files can be written into it: a folder, or one that can be made (no file in the way, the
    nearest existing folder writable). Checked at start-up, so a bad `flag` costs a line, not a computation."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise error(f"{flag} {out_dir} is a file; choose a folder")
    existing = next((p for p in (out_dir, *out_dir.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise error(f"{flag} {out_dir}: {existing} is a file; choose another folder")
    if not writable(existing):
        raise error(f"{flag} {out_dir}: {existing} is not writable; choose another folder")
    return out_dir


def check_new_folder(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """`out_dir` if an export may create it (CheckpointError if a file, a non-empty folder or a read-only
    folder is in the way)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} is a file; choose a new folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"{out_dir} exists and is not empty; choose a new folder (overwrite=True replaces it)")
    blocking = next((p for p in out_dir.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise CheckpointError(f"cannot create {out_dir}: {blocking} is a file; choose another folder")
    existing = next((p for p in out_dir.parents if p.is_dir()), None)
    if existing is not None and not writable(existing):
        raise CheckpointError(f"cannot create {out_dir}: {existing} is not writable; choose another folder")
    return out_dir


@contextlib.contextmanager
def new_folder(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling folder to write into; it becomes `out_dir` only if the block succeeds (see the
    module doc). A write the file system refuses raises CheckpointError naming `out_dir`."""
    out_dir = check_new_folder(out_dir, overwrite=overwrite)
    with made_dirs(out_dir.parent, CheckpointError):
        remove_leftovers(out_dir)
        tmp = out_dir.parent / f".{out_dir.name}{TMP}{os.getpid()}"
        try:
            tmp.mkdir()
            lock = _lock(tmp)
        except OSError as e:
            raise CheckpointError(f"cannot write {out_dir} ({write_failure(e) or e.strerror})") from None
        try:
            yield tmp
            if out_dir.exists() and overwrite:
                shutil.rmtree(out_dir)
            tmp.rename(out_dir)  # onto nothing, or onto the empty folder check_new_folder allowed
        except Exception as e:
            filled = isinstance(e, OSError) and e.errno in (errno.ENOTEMPTY, errno.EEXIST)
            why = "another writer filled it meanwhile" if filled else write_failure(e)
            if why is None:
                raise
            raise CheckpointError(f"cannot write {out_dir} ({why}); nothing was written") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            os.close(lock)


def remove_leftovers(out_dir: Path) -> list[Path]:
    """Remove the temporary folders of `out_dir` that no writer holds any more (killed ones); returns them."""
    removed = []
    for folder in out_dir.parent.glob(f".{out_dir.name}{TMP}*"):
        if not (folder.is_dir() and folder.name.rpartition(TMP)[2].isdigit()):
            continue
        try:
            fd = _lock(folder)
        except OSError:  # held: a live writer's folder, or one this process cannot open
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(fd)
        removed.append(folder)
    return removed


def _lock(folder: Path) -> int:
    """An exclusive, non-blocking flock on `folder` (an open fd); OSError if another process holds it."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def made_dirs(path: str | os.PathLike, error: type[JloraError] = CheckpointError) -> Iterator[Path]:
    """``mkdir -p path`` for the block; if the block raises, the folders it created go again (while empty).

    A folder that cannot be created raises `error` (one line, with the OS's reason).
    """
    path = Path(path)
    created = [p for p in (path, *path.parents) if not p.exists()]  # innermost first
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise error(f"cannot create {path} ({e.strerror}); choose another folder") from None
    try:
        yield path
    except BaseException:
        with contextlib.suppress(OSError):  # rmdir only removes an empty folder: what was written stays
            for folder in created:
                folder.rmdir()
        raise
