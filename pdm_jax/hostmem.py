"""Host allocator tuning for CPU training: fewer page faults from large, short-lived buffers.

XLA:CPU allocates and frees multi-megabyte activation buffers every step. glibc serves those
with fresh mmaps and returns them at free, so each step pays page faults on every new buffer.
Raising the mmap/trim thresholds keeps that memory in the heap for reuse; on the 2-core CPU here
it took CNN-BiLSTM training from ~4.1k to ~5.5k samples/s and inference from ~19k to ~30k
windows/s (measured 2026-11-27). Entry points call `tune()` once at start-up; a library import
never changes the process's allocator. `PDM_JAX_MALLOC_TUNING=0` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3


def tune() -> bool:
    """Applies the glibc thresholds; returns whether they were applied (Linux/glibc only)."""
    if os.environ.get("PDM_JAX_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or no libc: nothing to tune
        return False
    ok = (
        mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1
        and mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1
        and mallopt(_M_TOP_PAD, 256 << 20) == 1
    )
    log.info("host allocator tuning (glibc mallopt): %s", "on" if ok else "refused")
    return ok
