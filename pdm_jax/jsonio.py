"""The run directory's JSON files, written so a crash never leaves a half-written one, and the
dotted-key view of nested JSON objects that configs, checkpoints and logs compare and print."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
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


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train.num_steps': 10, ...}: dotted keys, as the command line names them."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
