"""The run directory's JSON files, written so a crash never leaves a half-written one."""

from __future__ import annotations

import json
import os
from typing import Any


def write_json(path: str, payload: Any) -> None:
    """Writes to a sibling temp file, then renames it over `path` (atomic on one filesystem)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def append_jsonl(path: str, record: dict[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
