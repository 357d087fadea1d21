"""Stopping a run cleanly: Ctrl-C (SIGINT) or SIGTERM ends the loop after the update in flight.

    with stop_requests(every=10) as requested:        # requested(step) -> bool
        run_hooks(train_steps(..., stop_requested=requested), hooks)

The first signal only sets a flag; the loop makes the current update its last, the checkpoint
hook saves it, and `jlora train` says so in one line (exit status 130). Rerunning the command
resumes there exactly. A second signal acts at once, as it would without this (Python's
KeyboardInterrupt for SIGINT, termination for SIGTERM), for a run that must die now.

A signal the process was started with ignored stays ignored: a shell starts a background job
(``jlora train ... &`` in a script) with SIGINT ignored, and that job must not stop at a SIGINT,
nor would a second one act. (Taking such a signal over would break both halves of the promise:
the first would stop the run, the second, handed back to "ignore", would do nothing.) A handler
installed outside Python (`signal.getsignal` gives None) is left alone too. When the block ends,
every handler is the one it found.

The processes of a multi-host run must stop at the same update (each takes part in every
collective and every save), so there a request is shared, any process's counting, at every
`every`-th update: one small all-gather at the points where the loop fetches its metrics anyway.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

import jax
import numpy as np

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_requests(every: int = 1) -> Iterator[Callable[[int], bool]]:
    """While the block runs, SIGINT and SIGTERM request a stop; yields ``requested(step) -> bool``."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield lambda step: False
        return
    found = {s: signal.getsignal(s) for s in SIGNALS}
    previous = {s: handler for s, handler in found.items() if handler not in (signal.SIG_IGN, None)}  # taken over

    def request(signum, frame) -> None:
        flag.set()
        for s, handler in previous.items():  # the next signal acts at once
            signal.signal(s, handler)

    for s in previous:
        signal.signal(s, request)
    try:
        yield _shared(flag, every) if jax.process_count() > 1 else lambda step: flag.is_set()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _shared(flag: threading.Event, every: int) -> Callable[[int], bool]:
    """``requested(step)``: whether any process of the run was asked to stop, checked every `every` updates."""
    from jax.experimental import multihost_utils

    def requested(step: int) -> bool:
        if step % every:
            return False
        return bool(np.any(multihost_utils.process_allgather(np.int32(flag.is_set()))))

    return requested
