"""Recorded accelerator machines, to lower and cost the real steps for them from a CPU.

No GPU or TPU run has been measured yet, and the layout decisions that would be made on one are
only as good as the snapshots they are replayed from. A target is one such snapshot (in the form
the detection tests replay, built with the same helpers) plus the vendor's published peak
figures per device, so `scripts/lower.py` can run `detect` and `decide` as `main` would there,
export the steps for that platform, and turn XLA's cost analysis into a roofline estimate.

The peaks are data-sheet maxima (dense, boost clock), not what these small models reach: the
estimate is a bound to compare layouts and targets by, never a measured speed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdm_jax.hardware.common import GiB
from pdm_jax.hardware.snapshot import DMI_DIR, Snapshot

# --- snapshot building blocks (tests/test_hardware.py records its environments with them too) ---

GCE_DMI = {
    f"{DMI_DIR}/product_name": "Google Compute Engine",
    f"{DMI_DIR}/sys_vendor": "Google",
    f"{DMI_DIR}/bios_vendor": "Google",
}
HOME = {"HOME": "/home/user"}


def devices(
    kind: str,
    count: int = 1,
    *,
    backend: str = "gpu",
    cc: str | None = None,
    memory_gib: float | None = None,
    processes: int = 1,
) -> list[dict[str, Any]]:
    """`count` devices split evenly over `processes`, as process 0's gather() records them."""
    per_process = count // processes
    return [
        {
            "platform": backend,
            "device_kind": kind,
            "compute_capability": cc,
            # memory_stats() is only readable for this process's devices
            "memory_bytes": int(memory_gib * GiB) if memory_gib and i < per_process else None,
            "process_index": i // per_process,
        }
        for i in range(count)
    ]


# --- targets ----------------------------------------------------------------------------------

TERA = 1e12


@dataclass(frozen=True)
class Target:
    """A machine to lower for: its recorded snapshot and per-device peaks (FLOP/s, bytes/s)."""

    name: str
    description: str
    platform: str  # the jax.export platform: 'cuda' | 'tpu'
    fixture: dict[str, Any]  # Snapshot.from_dict form, as tests/test_hardware.py records them
    bf16_flops: float  # dense bf16 matrix peak per device
    fp32_flops: float  # the rate fp32 work is assumed to run at (see each target)
    hbm_bytes_per_s: float  # device memory bandwidth

    def snapshot(self) -> Snapshot:
        return Snapshot.from_dict(self.fixture)

    @property
    def num_devices(self) -> int:
        return len(self.fixture["devices"])

    def peak_flops(self, dtype: str) -> float:
        return self.bf16_flops if dtype == "bfloat16" else self.fp32_flops

    def roofline(self, flops: float, bytes_accessed: float, dtype: str) -> tuple[float, str]:
        """(seconds, 'compute' | 'memory') for one device doing `flops` and moving
        `bytes_accessed`: whichever of the two takes longer at peak. It leaves out collectives,
        kernel launches and per-iteration loop overhead, all of which add time."""
        compute = flops / self.peak_flops(dtype)
        memory = bytes_accessed / self.hbm_bytes_per_s
        return max(compute, memory), ("compute" if compute >= memory else "memory")


# Per-device memory as jax's memory_stats()['bytes_limit'] reports a whole card or chip (the
# detection fixtures' values for the same parts).
_A100_80 = {"cc": "8.0", "memory_gib": 79.1}
_H100_80 = {"cc": "9.0", "memory_gib": 79.1}

TARGETS: dict[str, Target] = {
    "a100": Target(
        name="a100",
        description="1 x NVIDIA A100-SXM4-80GB (GCE a2-ultragpu-1g)",
        platform="cuda",
        fixture={
            "env": HOME,
            "files": GCE_DMI,
            "devices": devices("NVIDIA A100-SXM4-80GB", **_A100_80),
            "host_memory_bytes": 170 * GiB,
            "cpu_count": 12,
        },
        # NVIDIA A100 data sheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf), SXM 80GB:
        # BF16 tensor core 312 TFLOP/s dense (624 with sparsity), FP32 19.5 TFLOP/s, HBM2e
        # 2,039 GB/s. fp32 is the CUDA-core figure: elementwise work runs there; JAX's default
        # precision lets XLA run fp32 dots as TF32 (156 TFLOP/s dense), so a matmul-bound fp32
        # step can be up to 8x faster than this bound says.
        bf16_flops=312 * TERA,
        fp32_flops=19.5 * TERA,
        hbm_bytes_per_s=2.039e12,
    ),
    "h100x8": Target(
        name="h100x8",
        description="8 x NVIDIA H100 80GB HBM3 SXM, one host (GCE a3-highgpu-8g)",
        platform="cuda",
        fixture={
            "env": HOME,
            "files": GCE_DMI,
            "devices": devices("NVIDIA H100 80GB HBM3", 8, **_H100_80),
            "host_memory_bytes": 1844 * GiB,
            "cpu_count": 208,
        },
        # NVIDIA H100 data sheet, SXM: BF16 tensor core 1,979 TFLOP/s with sparsity, so 989
        # dense; FP32 67 TFLOP/s; HBM3 3.35 TB/s. fp32 as for the A100 (TF32: 494.7 dense).
        bf16_flops=989 * TERA,
        fp32_flops=67 * TERA,
        hbm_bytes_per_s=3.35e12,
    ),
    "tpu_v5e_8": Target(
        name="tpu_v5e_8",
        description="TPU v5e-8: 8 chips of 16 GB on one host (GCE v5litepod-8)",
        platform="tpu",
        fixture={
            "env": HOME | {"TPU_ACCELERATOR_TYPE": "v5litepod-8"},
            "files": GCE_DMI,
            "devices": devices("TPU v5 lite", 8, backend="tpu", memory_gib=15.75),
            "host_memory_bytes": 384 * GiB,
            "cpu_count": 224,
        },
        # cloud.google.com/tpu/docs/v5e, per chip: 197 TFLOP/s bf16, HBM2 16 GB at 819 GB/s.
        # fp32: no figure is published (the MXUs multiply bf16). This code sets no matmul
        # precision, and JAX's default on TPU computes an fp32 dot as one bf16 pass
        # (docs.jax.dev, "Matmul precision"), at the bf16 rate: so fp32 is taken at the bf16
        # peak. fp32 elementwise work runs on the vector unit, slower and unpublished, so fp32
        # estimates on TPU are optimistic on the compute side; the layout picks bf16 there.
        bf16_flops=197 * TERA,
        fp32_flops=197 * TERA,
        hbm_bytes_per_s=819e9,
    ),
    "tpu_v4_32": Target(
        name="tpu_v4_32",
        description="TPU v4-32: 16 chips (32 TensorCores, megacore) on 4 hosts of 4 chips",
        platform="tpu",
        fixture={  # host 0's view: jax shows one device per megacore chip
            "env": HOME | {"TPU_ACCELERATOR_TYPE": "v4-32", "TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"},
            "files": GCE_DMI,
            "devices": devices("TPU v4", 16, backend="tpu", memory_gib=30.75, processes=4),
            "process_count": 4,
            "host_memory_bytes": 400 * GiB,
            "cpu_count": 240,
        },
        # cloud.google.com/tpu/docs/v4, per chip: 275 TFLOP/s (bf16 or int8), HBM2 32 GiB at
        # 1,200 GB/s. fp32 taken at the bf16 peak, for the reasons given for v5e.
        bf16_flops=275 * TERA,
        fp32_flops=275 * TERA,
        hbm_bytes_per_s=1.2e12,
    ),
}


def target(name: str) -> Target:
    """The named target; ValueError listing the known ones otherwise."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; expected one of {', '.join(TARGETS)}")
    return TARGETS[name]
