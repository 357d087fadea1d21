"""Stop requests: the first SIGINT or SIGTERM only asks the loop to stop; the second acts at once; a signal the
process was started with ignored stays ignored."""

import os
import signal
import subprocess
import sys

import pytest

from jlora.training.run.interrupt import stop_requests


@pytest.fixture
def usual_handlers():
    """Python's own handlers (KeyboardInterrupt for SIGINT, termination for SIGTERM), whatever this process
    inherited: a suite started in the background by a script inherits SIGINT ignored (see below)."""
    found = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for s, handler in found.items():
        signal.signal(s, handler)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_requests_a_stop_and_the_second_acts(signum, usual_handlers):
    before = signal.getsignal(signum)
    with stop_requests() as requested:
        assert not requested(1)
        os.kill(os.getpid(), signum)
        assert requested(2)
        assert signal.getsignal(signum) is before  # the next one goes to the usual handler
    assert signal.getsignal(signum) is before


def test_a_second_ctrl_c_interrupts_at_once(usual_handlers):
    with pytest.raises(KeyboardInterrupt), stop_requests() as requested:
        os.kill(os.getpid(), signal.SIGINT)
        assert requested(1)
        os.kill(os.getpid(), signal.SIGINT)


def test_an_ignored_sigint_stays_ignored(usual_handlers):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with stop_requests() as requested:
        os.kill(os.getpid(), signal.SIGINT)
        assert not requested(1) and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGTERM)  # what is not ignored still asks the run to stop
        assert requested(2)
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


# What made test_a_second_ctrl_c_interrupts_at_once fail "after other tests" (DID NOT RAISE KeyboardInterrupt):
# no test leaves a handler behind; the suite was started as a background job, and a shell without job control
# starts one with SIGINT ignored (POSIX), which every pytest worker inherits. stop_requests took the ignored
# SIGINT over, then handed the second one back to "ignore". The same, in a process a shell starts that way:
INHERITED = """
import os, signal
from jlora.training.run.interrupt import stop_requests

print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)
with stop_requests() as requested:
    os.kill(os.getpid(), signal.SIGINT)
    print(requested(1))
print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)
"""


def test_a_background_job_inherits_sigint_ignored_and_keeps_it_so(tmp_path):
    script = tmp_path / "inherited.py"
    script.write_text(INHERITED)
    done = subprocess.run(
        ["sh", "-c", f'"{sys.executable}" "{script}" & wait'], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "False", "True"]  # ignored on entry; no stop requested; still ignored
