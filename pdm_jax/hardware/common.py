"""Helpers shared by the layout decisions and their report.

Configs written before a key existed must still load, so every read tolerates a missing or unset
key; values may come from a command line as strings, so integers are accepted in both spellings.
"""

from __future__ import annotations

import math
from typing import Any

GiB = 1 << 30


def setting(config: Any, dotted: str, default: Any) -> Any:
    """config.<dotted>, or `default` when a key is missing or unset (an older config)."""
    node = config
    for part in dotted.split("."):
        if node is None:
            return default
        try:
            node = node.get(part, None) if hasattr(node, "get") else getattr(node, part, None)
        except (AttributeError, KeyError, TypeError):
            return default
    return default if node is None else node


def is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == "auto"


def as_int(value: Any) -> int | None:
    """An integer or its decimal string; None for anything else (True is not a count)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def divisors(n: int) -> list[int]:
    """The divisors of n in ascending order."""
    small, large = [], []
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            small.append(d)
            if d != n // d:
                large.append(n // d)
    return small + large[::-1]


def human_size(n: float) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"
