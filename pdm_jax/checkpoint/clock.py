"""When a run saves: every `every_steps`, every `every_minutes`, and on the way out.

Why apart from the store: the store decides how a save survives storage trouble; this decides
only when one is due, and the minutes must be agreed across processes (a save only some
processes enter would deadlock in Orbax's barriers).
"""

from __future__ import annotations

import time
from typing import Any

from pdm_jax import parallel


class SaveClock:
    """When to save: every `every_steps`, every `every_minutes` (agreed across processes), and
    on the way out (early stop, stop signal, last step)."""

    def __init__(self, config: Any):
        """`config`: the `checkpoint` section of a run's config."""
        self.every_steps = int(config.every_steps)
        self.every_s = float(config.every_minutes) * 60
        self.last = time.monotonic()

    def due(self, step: int, sync: bool) -> bool:
        if self.every_steps and step % self.every_steps == 0:
            return True
        late = time.monotonic() - self.last >= self.every_s
        return bool(sync and self.every_s and parallel.agree(late))

    def saved(self) -> None:
        self.last = time.monotonic()
