"""Stop cleanly on SIGTERM/SIGINT: finish the running step, save it, exit; a second signal exits
at once.

Cloud VMs, SLURM and Colab send SIGTERM before taking a machine away; losing everything since the
last periodic save would make preemptible hardware useless. With several processes the decision
must be agreed (a save only some processes enter would hang), so process 0's flag is broadcast.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from types import FrameType
from typing import Any

from pdm_jax import parallel

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            log.warning("second %s: exiting without saving", signal.Signals(signum).name)
            sys.exit(128 + signum)
        self.received = signum
        log.warning(
            "%s received: saving after the current step (send again to exit at once)",
            signal.Signals(signum).name,
        )

    def agreed(self, step: int) -> bool:
        """True on every process when process 0 (or this single process) was signalled."""
        del step
        return parallel.agree(self.received is not None)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
