"""What a run uses while it trains: host RSS and device memory, read at each logged step.

Why in every logged step: a run that creeps towards the host's or the device's limit shows it in
metrics.jsonl, TensorBoard and MLflow long before it dies of it. Each reading is cheap (a /proc
file, the runtime's allocator counters) and missing where the platform has none: XLA:CPU keeps
no device allocator statistics, so a CPU run logs host memory only.
"""

from __future__ import annotations

import os
import resource
import sys
from typing import Any

MB = 1 << 20


def host_rss_bytes() -> int:
    """Resident memory now (Linux: /proc/self/statm); elsewhere the peak, the best the
    platform reports without psutil."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def sample(devices: list[Any] | None = None) -> dict[str, float]:
    """`host_rss_mb`, and `device_mem_mb`/`device_peak_mb` (the fullest local device's) where
    the backend reports them."""
    import jax

    out = {"host_rss_mb": round(host_rss_bytes() / MB, 1)}
    in_use, peak = [], []
    for device in jax.local_devices() if devices is None else devices:
        stats = device.memory_stats() or {}
        if "bytes_in_use" in stats:
            in_use.append(stats["bytes_in_use"])
            peak.append(stats.get("peak_bytes_in_use", stats["bytes_in_use"]))
    if in_use:
        out["device_mem_mb"] = round(max(in_use) / MB, 1)
        out["device_peak_mb"] = round(max(peak) / MB, 1)
    return out
