"""Stop requests: the first SIGINT or SIGTERM only asks the loop to stop; the second acts at once."""

import os
import signal

import pytest

from jlora.training.run.interrupt import stop_requests


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_requests_a_stop_and_the_second_acts(signum):
    before = signal.getsignal(signum)
    with stop_requests() as requested:
        assert not requested(1)
        os.kill(os.getpid(), signum)
        assert requested(2)
        assert signal.getsignal(signum) is before  # the next one goes to the usual handler
    assert signal.getsignal(signum) is before


def test_a_second_ctrl_c_interrupts_at_once():
    with pytest.raises(KeyboardInterrupt), stop_requests() as requested:
        os.kill(os.getpid(), signal.SIGINT)
        assert requested(1)
        os.kill(os.getpid(), signal.SIGINT)
