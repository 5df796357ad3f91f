"""What follows from the platform: the Layout of a run, every hardware-dependent choice with who
made it (config or auto) and why.

Explicit config values always win. They are checked here so an impossible layout fails at
start-up with a ConfigError naming the key, not later as an XLA shape error or an OOM.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pdm_jax.errors import ConfigError
from pdm_jax.hardware.common import as_int, is_auto, setting
from pdm_jax.hardware.detection import Platform
from pdm_jax.hardware.memory import decide_memory


@dataclass(frozen=True)
class Layout:
    """Every hardware-dependent decision of a run, who made it and why."""

    mesh_shape: tuple[int, int]  # (data, model); the model axis is reserved and always 1
    dtype: str  # 'float32' | 'bfloat16'
    global_batch: int
    grad_accum: int
    per_device_batch: int  # global_batch // (data * grad_accum)
    remat: tuple[str, ...]  # model blocks to rematerialise
    data_workers: int  # grain prefetch threads
    infer_microbatch: int  # windows per chunk of a prediction batch; 0 = the whole batch at once
    xla_flags: tuple[str, ...]
    compilation_cache_dir: str | None
    sources: Mapping[str, str]  # decision name -> 'auto' | 'config'
    notes: tuple[str, ...]  # '<decision>: <reason>' per auto decision, plus warnings


# Layout field -> the config key that sets it (None: derived from others).
CONFIG_KEYS: dict[str, str | None] = {
    "mesh_shape": "compute.mesh",
    "dtype": "compute.dtype",
    "global_batch": "train.batch_size",
    "grad_accum": "train.grad_accum",
    "per_device_batch": None,
    "remat": "model.remat",
    "data_workers": "data.num_threads",
    "infer_microbatch": "compute.infer_microbatch",
    "xla_flags": "compute.xla_flags",
    "compilation_cache_dir": "compute.compilation_cache",
}


def _decide_mesh(platform: Platform, value: Any) -> tuple[tuple[int, int], bool]:
    if is_auto(value):
        return (platform.num_devices, 1), True
    shape: Any = value
    if isinstance(value, str):
        shape = [p for p in re.split(r"[\s,()\[\]x]+", value) if p]
    dims = [as_int(d) for d in shape] if isinstance(shape, list | tuple) else []
    data, model = (dims[0], dims[1]) if len(dims) == 2 else (None, None)
    if data is None or model != 1 or data * model != platform.num_devices:
        raise ConfigError(
            f"config.compute.mesh: expected 'auto' or (data, model) with model == 1 (the model "
            f"axis is reserved) and data * model == {platform.num_devices} devices, got {value!r}"
        )
    return (data, 1), False


def _check_batch(value: Any, data: int) -> int:
    batch = as_int(value)
    if batch is None or batch <= 0:
        raise ConfigError(
            f"config.train.batch_size: expected an integer > 0 (the global batch), got {value!r}"
        )
    if batch % data:
        below, above = (batch // data) * data, (batch // data + 1) * data
        nearest = f"{below} or {above}" if below else f"{above}"
        raise ConfigError(
            f"config.train.batch_size: the global batch {batch} is not divisible by the "
            f"data-parallel size {data}; nearest valid values: {nearest}"
        )
    return batch


def _decide_dtype(platform: Platform, value: Any) -> tuple[str, bool, str]:
    if not is_auto(value):
        if value not in ("float32", "bfloat16"):
            raise ConfigError(
                f"config.compute.dtype: expected 'auto', 'float32' or 'bfloat16', got {value!r}"
            )
        return value, False, ""
    if platform.backend == "tpu":
        return "bfloat16", True, "TPUs compute bf16 natively"
    if platform.backend == "gpu":
        capability = _capability(platform.compute_capability)
        if capability is None:
            return "float32", True, "GPU compute capability unknown: bf16 support not assumed"
        if capability >= (8, 0):
            cc = platform.compute_capability
            return "bfloat16", True, f"compute capability {cc} >= 8.0 has bf16 tensor cores"
        cc = platform.compute_capability
        return "float32", True, f"compute capability {cc} < 8.0: bf16 would be emulated"
    return "float32", True, f"{platform.backend}: bf16 measured slower than fp32 on XLA:CPU"


def _capability(text: str | None) -> tuple[int, int] | None:
    match = re.match(r"^\s*(\d+)(?:\.(\d+))?", text or "")
    return (int(match.group(1)), int(match.group(2) or 0)) if match else None


def _decide_workers(platform: Platform, value: Any) -> tuple[int, bool, str]:
    if not is_auto(value):
        workers = as_int(value)
        if workers is None or workers < 0:
            raise ConfigError(
                f"config.data.num_threads: expected 'auto' or an integer >= 0, got {value!r}"
            )
        return workers, False, ""
    if platform.backend == "cpu":
        return 1, True, "CPU: data is in memory; more threads fight the GIL and XLA for the cores"
    # Accelerators: windows are gathered from in-memory arrays, so a few threads per process keep
    # the device fed; half the cores per device are left to the training loop and XLA's host
    # runtime, and past 4 threads only add GIL contention.
    workers = min(4, max(1, platform.cpu_count // (2 * max(1, platform.local_devices))))
    return (
        workers,
        True,
        (f"{platform.cpu_count} CPUs / (2 x {platform.local_devices} local devices), in [1, 4]"),
    )


# Measured with scripts/benchmark.py --what=infer on the 2-core CPU (docs/DESIGN.md): the TFT's
# forward at batch 1024 runs ~2x faster as 32 chunks of 32 windows, whose [V, N, D] variable-
# selection intermediates stay in cache; the CNN-BiLSTM's forward gains nothing from it.
CPU_INFER_MICROBATCH = {"tft": 32, "cnn_bilstm": 0}


def decide_infer_microbatch(backend: str, model: str, value: Any = "auto") -> tuple[int, bool, str]:
    """(windows per chunk of a prediction batch, auto?, why); 0 runs the batch at once.

    Also used by batch inference, which decides for the machine it runs on, not the training's.
    """
    if not is_auto(value):
        chunk = as_int(value)
        if chunk is None or chunk < 0:
            raise ConfigError(
                "config.compute.infer_microbatch: expected 'auto' or an integer >= 0, got "
                f"{value!r}"
            )
        return chunk, False, ""
    if backend == "cpu":
        chunk = CPU_INFER_MICROBATCH.get(model, 0)
        if chunk:
            return chunk, True, f"CPU: {model} forward in cache-sized chunks of {chunk} windows"
        return 0, True, f"CPU: {model} gains nothing from chunking its forward"
    return 0, True, "accelerator: the whole batch at once"


# One XLA option as --xla_<name>[=<value>]; compiler_options() parses the same spelling.
XLA_FLAG = re.compile(r"^--(xla_[a-z0-9_]+)(?:=(.*))?$")


def _decide_xla_flags(platform: Platform, value: Any) -> tuple[tuple[str, ...], bool, str]:
    if not is_auto(value):
        if isinstance(value, str):
            flags = tuple(value.split())
        elif isinstance(value, list | tuple) and all(isinstance(f, str) for f in value):
            flags = tuple(value)
        else:
            flags = ("",)
        if not all(XLA_FLAG.match(f) for f in flags):
            raise ConfigError(
                f"config.compute.xla_flags: expected 'auto' or a string of --xla_<name>=<value> "
                f"options ('' for none), got {value!r}"
            )
        return flags, False, ""
    if platform.backend == "gpu" and platform.num_devices > 1:
        return (
            ("--xla_gpu_enable_latency_hiding_scheduler=true",),
            True,
            "several GPUs: overlap the gradient all-reduce with compute",
        )
    return (), True, f"none needed on {platform.backend} with {platform.num_devices} device(s)"


def _decide_cache(platform: Platform, value: Any) -> tuple[str | None, bool, str]:
    if not is_auto(value):
        if not isinstance(value, str):
            raise ConfigError(
                f"config.compute.compilation_cache: expected 'auto', '' (off) or a directory, "
                f"got {value!r}"
            )
        if not value.strip():
            return None, False, ""
        return (value if "://" in value else os.path.expanduser(value)), False, ""
    if platform.backend == "cpu":
        return None, True, "CPU: compiles take seconds, a cache would only fill the disk"
    home = platform.cache_home or os.path.join(os.path.expanduser("~"), ".cache")
    return (
        os.path.join(home, "pdm_jax", "jax_cache"),
        True,
        f"{platform.backend}: reuse compiled steps across runs (compiles take minutes)",
    )


def decide(platform: Platform, config: Any) -> Layout:
    """The layout for `config` on `platform`: explicit values checked and kept, 'auto' decided.

    Raises ConfigError naming the key when an explicit value cannot work on this platform.
    """
    notes: list[str] = []
    sources: dict[str, str] = {}

    def record(name: str, auto: bool, reason: str = "") -> None:
        sources[name] = "auto" if auto else "config"
        if auto and reason:
            notes.append(f"{name}: {reason}")

    mesh, auto = _decide_mesh(platform, setting(config, "compute.mesh", "auto"))
    data = mesh[0]
    record("mesh_shape", auto, f"all {platform.num_devices} device(s) data-parallel")
    batch = _check_batch(setting(config, "train.batch_size", None), data)
    record("global_batch", False)
    dtype, auto, reason = _decide_dtype(platform, setting(config, "compute.dtype", "auto"))
    record("dtype", auto, reason)

    per_replica = batch // data
    remat, remat_auto, accum, accum_auto, memory_notes = decide_memory(
        config, platform, dtype, per_replica, batch, data
    )
    sources["remat"] = "auto" if remat_auto else "config"
    sources["grad_accum"] = "auto" if accum_auto else "config"
    notes.extend(memory_notes)
    per_device = batch // (data * accum)
    record(
        "per_device_batch",
        sources["mesh_shape"] == "auto" or accum_auto,
        f"{batch} / ({data} data x {accum} accumulation steps)",
    )

    workers, auto, reason = _decide_workers(platform, setting(config, "data.num_threads", "auto"))
    record("data_workers", auto, reason)
    chunk, auto, reason = decide_infer_microbatch(
        platform.backend,
        setting(config, "model.name", "tft"),
        setting(config, "compute.infer_microbatch", "auto"),
    )
    record("infer_microbatch", auto, reason)
    flags, auto, reason = _decide_xla_flags(platform, setting(config, "compute.xla_flags", "auto"))
    record("xla_flags", auto, reason)
    cache, auto, reason = _decide_cache(
        platform, setting(config, "compute.compilation_cache", "auto")
    )
    record("compilation_cache_dir", auto, reason)
    notes.extend(f"platform: {w}" for w in platform.warnings)
    return Layout(
        mesh_shape=mesh,
        dtype=dtype,
        global_batch=batch,
        grad_accum=accum,
        per_device_batch=per_device,
        remat=remat,
        data_workers=workers,
        infer_microbatch=chunk,
        xla_flags=flags,
        compilation_cache_dir=cache,
        sources={name: sources[name] for name in CONFIG_KEYS},
        notes=tuple(notes),
    )
