"""Stop signals in-process: SIGINT (Ctrl-C) asks for a save like SIGTERM; a second one exits."""

import os
import signal

import pytest

from pdm_jax import preempt


@pytest.mark.parametrize("first", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_asks_for_a_save_and_a_second_exits_at_once(first):
    stop = preempt.StopSignal()
    try:
        assert not stop.agreed(step=1)
        os.kill(os.getpid(), first)
        assert stop.received == first and stop.agreed(step=2)
        with pytest.raises(SystemExit) as exit_info:
            os.kill(os.getpid(), signal.SIGINT)
        assert exit_info.value.code == 128 + signal.SIGINT
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
