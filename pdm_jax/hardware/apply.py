"""What a decided layout becomes outside this package: the start-up log block, the entry in
run_info.json, and the settings applied to jax once its backend has started.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

from pdm_jax.hardware.common import human_size
from pdm_jax.hardware.detection import Platform
from pdm_jax.hardware.layout import CONFIG_KEYS, XLA_FLAG, Layout

log = logging.getLogger(__name__)

# --- reporting ---------------------------------------------------------------------------------


def _show(value: Any) -> str:
    if value is None:
        return "off"
    if isinstance(value, tuple):
        return "(" + ", ".join(map(str, value)) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def describe(platform: Platform, layout: Layout) -> str:
    """A readable block for the start-up log: the platform, then each decision with its value,
    who made it and why."""
    memory = (
        f", {human_size(platform.device_memory_bytes)}/device"
        if platform.device_memory_bytes
        else ""
    )
    capability = f", cc {platform.compute_capability}" if platform.compute_capability else ""
    host = human_size(platform.host_memory_bytes) if platform.host_memory_bytes else "unknown"
    lines = [
        f"platform: {platform.backend} {platform.accelerator} ({platform.device_kind}{capability}"
        f"{memory}) x {platform.num_devices}, {platform.local_devices} local, "
        f"process {platform.process_index} of {platform.process_count}",
        f"environment: {platform.environment} (runtime {platform.runtime}, scheduler "
        f"{platform.scheduler or 'none'}); host memory {host}, {platform.cpu_count} CPUs",
        "layout:",
    ]
    reasons: dict[str, list[str]] = {}
    extra = []
    for note in layout.notes:
        name, _, reason = note.partition(": ")
        if name in CONFIG_KEYS:
            reasons.setdefault(name, []).append(reason)
        else:
            extra.append(note)
    for name, key in CONFIG_KEYS.items():
        source = layout.sources.get(name, "auto")
        why = "; ".join(reasons.get(name, ()))
        if source == "config" and key:
            why = f"set by config.{key}" + (f"; {why}" if why else "")
        value = _show(getattr(layout, name))
        lines.append(f"  {name:<22} {value:<24} {source:<6} {why}".rstrip())
    lines.extend(f"  note: {note}" for note in extra)
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def to_dict(platform: Platform, layout: Layout) -> dict[str, Any]:
    """JSON-able {'platform': ..., 'layout': ...} for run_info.json."""
    return {
        "platform": _plain(dataclasses.asdict(platform)),
        "layout": _plain({f.name: getattr(layout, f.name) for f in dataclasses.fields(layout)}),
    }


# --- applying a layout -------------------------------------------------------------------------


def _option_value(text: str | None) -> bool | int | float | str:
    if text is None or text.lower() == "true":
        return True
    if text.lower() == "false":
        return False
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def compiler_options(layout: Layout) -> dict[str, bool | int | float | str]:
    """layout.xla_flags as `jax.jit(..., compiler_options=...)`.

    XLA reads $XLA_FLAGS once, when the backend starts, and gather() has started it by the time a
    layout exists; per-compile options are the way left to apply them. Values are typed (XLA
    rejects the string 'true' for a bool option).
    """
    options: dict[str, bool | int | float | str] = {}
    for flag in layout.xla_flags:
        match = XLA_FLAG.match(flag)
        if match:
            options[match.group(1)] = _option_value(match.group(2))
    return options


def apply_runtime(layout: Layout) -> dict[str, bool | int | float | str]:
    """Applies what can still change after the backend started (the persistent compilation
    cache) and returns `compiler_options(layout)` for the jitted steps."""
    import jax

    cache = layout.compilation_cache_dir
    if cache:
        if "://" not in cache:
            os.makedirs(cache, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", cache)
        log.info("persistent compilation cache: %s", cache)
    options = compiler_options(layout)
    if options:
        log.info("XLA options for the jitted steps (jax.jit compiler_options): %s", options)
    return options
