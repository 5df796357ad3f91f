"""The snapshot detection works from, and `gather()`, the only code that reads the live system.

gather() reads local signals only (environment variables, DMI files, whether a module could be
imported, jax's device list). It never asks a cloud metadata server: off-cloud that hangs until a
timeout, and it never imports vendor SDKs, which are slow and have side effects. Everything after
it is a pure function of the Snapshot, so snapshots recorded elsewhere replay in the tests.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import importlib.util
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DMI_DIR = "/sys/class/dmi/id"  # the key prefix of Snapshot.files, wherever they were read from
_DMI_ROOT = DMI_DIR  # where gather() reads them (tests point this at a temporary directory)
DMI_FILES = (
    "sys_vendor",
    "product_name",
    "product_version",
    "product_uuid",  # root-only on most distributions: usually absent, which is fine
    "bios_vendor",
    "board_vendor",
    "chassis_asset_tag",
    "board_asset_tag",
)
# Modules that exist only inside one managed environment (never imported, only located).
PROBED_MODULES = ("google.colab", "kaggle_secrets", "sagemaker_training")
# Environment variables kept in a Snapshot: the signals detect() reads, nothing else, so a
# recorded snapshot can be attached to a bug report. Values of secret-looking keys are redacted.
_ENV_PREFIXES = (
    "COLAB_",
    "KAGGLE_",
    "AIP_",
    "CLOUD_ML_",
    "SM_",
    "SAGEMAKER_",
    "TRAINING_JOB_",
    "AZUREML_",
    "SLURM_",
    "TPU_",
)
_ENV_KEYS = (
    "CUDA_VISIBLE_DEVICES",
    "JAX_PLATFORMS",
    "XLA_FLAGS",
    "XDG_CACHE_HOME",
    "HOME",
    "KUBERNETES_SERVICE_HOST",
)
_SECRET = re.compile(r"TOKEN|SECRET|PASSWORD|CREDENTIAL|_KEY$", re.IGNORECASE)
REDACTED = "<redacted>"


@dataclass(frozen=True)
class DeviceInfo:
    """What jax reports about one device (jax.devices()), as plain values."""

    platform: str  # 'cpu' | 'gpu' | 'tpu'
    device_kind: str  # e.g. 'NVIDIA A100-SXM4-40GB', 'TPU v5 lite'
    compute_capability: str | None = None  # CUDA devices only, e.g. '8.0'
    memory_bytes: int | None = None  # memory_stats()['bytes_limit'], local devices only
    process_index: int = 0


@dataclass(frozen=True)
class Snapshot:
    """Everything detect() looks at, read once by gather() or loaded from a recorded fixture."""

    env: Mapping[str, str]
    files: Mapping[str, str]  # '/sys/class/dmi/id/<name>' -> stripped content; unreadable: absent
    modules: frozenset[str]  # the PROBED_MODULES that could be imported
    devices: tuple[DeviceInfo, ...]  # all devices, across processes
    process_count: int
    process_index: int
    host_memory_bytes: int | None
    cpu_count: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, to record a fixture or attach to a bug report (env is pre-filtered)."""
        return {
            "env": dict(self.env),
            "files": dict(self.files),
            "modules": sorted(self.modules),
            "devices": [dataclasses.asdict(d) for d in self.devices],
            "process_count": self.process_count,
            "process_index": self.process_index,
            "host_memory_bytes": self.host_memory_bytes,
            "cpu_count": self.cpu_count,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Snapshot:
        return cls(
            env=dict(data.get("env", {})),
            files=dict(data.get("files", {})),
            modules=frozenset(data.get("modules", ())),
            devices=tuple(DeviceInfo(**d) for d in data.get("devices", ())),
            process_count=int(data.get("process_count", 1)),
            process_index=int(data.get("process_index", 0)),
            host_memory_bytes=data.get("host_memory_bytes"),
            cpu_count=int(data.get("cpu_count", 1)),
        )


# --- gather: the only function that reads the live system ------------------------------------


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read(4096).strip()
    except OSError:
        return None


def _importable(name: str) -> bool:
    """Whether `name` could be imported, without executing it or any parent package.

    importlib.util.find_spec('a.b') imports 'a'; instead the top level is only located and the
    submodule looked up in its search path.
    """
    top, _, rest = name.partition(".")
    try:
        spec = importlib.util.find_spec(top)
        for part in rest.split(".") if rest else ():
            if spec is None or not spec.submodule_search_locations:
                return False
            spec = importlib.machinery.PathFinder.find_spec(
                part, list(spec.submodule_search_locations)
            )
        return spec is not None
    except (ImportError, ValueError, AttributeError):
        return False


def _filtered_env(environ: Mapping[str, str]) -> dict[str, str]:
    kept = {}
    for key, value in environ.items():
        if key in _ENV_KEYS or key.startswith(_ENV_PREFIXES):
            kept[key] = REDACTED if _SECRET.search(key) else value
    return kept


def _host_memory() -> int | None:
    """Physical memory, or the container's cgroup limit when that is lower."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        total = None
    if total is not None and total <= 0:
        total = None
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        text = _read_text(path)
        if text and text.isdigit() and int(text) > 0:
            limit = int(text)  # cgroup v1 writes ~2**63 for "unlimited": min() drops it
            total = limit if total is None else min(total, limit)
            break
    return total


def _cpu_count() -> int:
    """CPUs this process may run on (affinity: honours taskset, SLURM and container pinning)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _safe(get: Any, default: Any = None) -> Any:
    try:
        return get()
    except Exception:  # a backend attribute that raises is an attribute we don't have
        return default


def _device_info(device: Any, local_process: int) -> DeviceInfo:
    platform = str(_safe(lambda: device.platform, "cpu"))
    process = _safe(lambda: int(device.process_index), 0)
    capability = _safe(lambda: device.compute_capability)
    memory = None
    if process == local_process:  # memory_stats() of another host's device is not available
        stats = _safe(device.memory_stats) if hasattr(device, "memory_stats") else None
        memory = _safe(lambda: int(stats["bytes_limit"])) if stats else None
    return DeviceInfo(
        platform=platform,
        device_kind=str(_safe(lambda: device.device_kind, platform)),
        compute_capability=str(capability) if capability not in (None, "") else None,
        memory_bytes=memory,
        process_index=process,
    )


def gather() -> Snapshot:
    """Reads the live system once. Initialises jax's backend (jax.devices()); a backend that
    fails to start raises here, since nothing can run without one."""
    import jax

    process_index = int(jax.process_index())
    files = {}
    for name in DMI_FILES:
        text = _read_text(os.path.join(_DMI_ROOT, name))
        if text is not None:
            files[f"{DMI_DIR}/{name}"] = text
    return Snapshot(
        env=_filtered_env(os.environ),
        files=files,
        modules=frozenset(m for m in PROBED_MODULES if _importable(m)),
        devices=tuple(_device_info(d, process_index) for d in jax.devices()),
        process_count=int(jax.process_count()),
        process_index=process_index,
        host_memory_bytes=_host_memory(),
        cpu_count=_cpu_count(),
    )
