"""Where training numbers go: `metrics.jsonl` for scripts and TensorBoard events under `tb/`.

One writer feeds both (and the MLflow tracker, when one is set) so they never disagree.
TensorBoard files come from tensorboardX (pure Python, protobuf only): the event format without
TensorFlow. Only the primary process writes; the others hold a writer that does nothing, so call
sites need no rank checks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from pdm_jax import jsonio

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


class MetricWriter:
    def __init__(
        self, workdir: str, enabled: bool = True, tensorboard: bool = True, sink: Any = None
    ):
        self.enabled = enabled
        self.sink = sink  # tracking.Tracker: receives every record too
        self.path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, TB_DIR), flush_secs=30)

    def write(self, step: int, record: Mapping[str, Any]) -> None:
        """Appends one JSON line and one TB scalar per numeric field (tag `<group>/<name>`)."""
        if not self.enabled:
            return
        jsonio.append_jsonl(self.path, {"step": int(step), **record})
        if self.sink is not None:
            self.sink.metrics(step, record)
        if self._tb is None:
            return
        for name, value in record.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self._tb.add_scalar(_tag(name), float(value), int(step))

    def text(self, tag: str, text: str) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_text(tag, text, 0)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str) -> list[dict[str, Any]]:
    """metrics.jsonl's records, [] without the file; a line cut short by a crash is skipped."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as handle:
        for line in handle:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _tag(name: str) -> str:
    for prefix in ("val", "test", "train"):
        if name.startswith(prefix + "_"):
            return f"{prefix}/{name[len(prefix) + 1 :]}"
    return f"train/{name}"
