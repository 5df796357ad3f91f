"""A dependency-free progress line for long loops: rate and ETA on stderr.

On a terminal it redraws one line; in logs (CI, Colab cells captured to files) it prints a
line at most every `log_every_s` seconds so output stays readable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


class Progress:
    def __init__(
        self,
        total: int | None,
        unit: str = "it",
        desc: str = "",
        stream: TextIO | None = None,
        log_every_s: float = 10.0,
        enabled: bool = True,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.total = total
        self.unit = unit
        self.desc = desc
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.1 if self.tty else log_every_s
        self.enabled = enabled
        self.count = 0
        self.status = ""  # free text shown after the rate, e.g. "epoch 3.2, loss 0.41"
        # The clock's origin is arbitrary (perf_counter counts from boot on Linux), so the first
        # line is due at once rather than `interval` after the origin.
        self._clock = clock
        self.start = clock()
        self._last: float | None = None
        self._shown = -1  # count at the last line written

    @property
    def rate(self) -> float:
        elapsed = self._clock() - self.start
        return self.count / elapsed if elapsed > 0 else 0.0

    def _line(self) -> str:
        rate = self.rate
        done = f"{self.count}" + (f"/{self.total}" if self.total else "")
        eta = ""
        if self.total and rate > 0:
            eta = f", eta {max(self.total - self.count, 0) / rate:.0f}s"
        status = f", {self.status}" if self.status else ""
        return f"{self.desc}: {done} {self.unit} ({rate:,.1f} {self.unit}/s{eta}{status})"

    def update(self, n: int = 1) -> None:
        self.count += n
        now = self._clock()
        if self.enabled and (self._last is None or now - self._last >= self.interval):
            self._last = now
            self._shown = self.count
            self.stream.write(
                ("\r" if self.tty else "") + self._line() + ("" if self.tty else "\n")
            )
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and (self.tty or self._shown != self.count):
            self.stream.write(("\r" if self.tty else "") + self._line() + "\n")
            self.stream.flush()
