"""Platform detection and layout decisions, replayed from snapshots of each environment.

Pure and fast: every environment is a recorded `Snapshot` (env vars, DMI files, importable
modules, jax devices), so Colab, Kaggle, the clouds and SLURM are tested on this CPU box. Only
the gather() tests read the live machine.
"""

from __future__ import annotations

import copy
import functools
import json
import sys
from typing import Any

import ml_collections
import pytest

from pdm_jax import hardware
from pdm_jax.configuration import load_config
from pdm_jax.errors import ConfigError
from pdm_jax.hardware import DMI_DIR, GiB, Snapshot
from pdm_jax.hardware import snapshot as snapshot_module
from pdm_jax.hardware.targets import GCE_DMI, HOME, TARGETS, devices

# --- recorded environments --------------------------------------------------------------------

AZURE_DMI = {
    f"{DMI_DIR}/sys_vendor": "Microsoft Corporation",
    f"{DMI_DIR}/product_name": "Virtual Machine",
    f"{DMI_DIR}/bios_vendor": "Microsoft Corporation",
    f"{DMI_DIR}/chassis_asset_tag": hardware.AZURE_ASSET_TAG,
}
EC2_DMI = {
    f"{DMI_DIR}/sys_vendor": "Amazon EC2",
    f"{DMI_DIR}/product_name": "g5.xlarge",
    f"{DMI_DIR}/bios_vendor": "Amazon EC2",
}


CPU = devices("cpu", backend="cpu")
T4 = {"cc": "7.5", "memory_gib": 14.7}
A100_40 = {"cc": "8.0", "memory_gib": 38.4}
V100_16 = {"cc": "7.0", "memory_gib": 15.5}
H100 = {"cc": "9.0", "memory_gib": 79.1}

FIXTURES: dict[str, dict[str, Any]] = {
    "colab_t4": {
        "env": {"COLAB_GPU": "1", "COLAB_RELEASE_TAG": "release-colab_20250115-060000_RC00"}
        | {"HOME": "/root"},
        "files": GCE_DMI,
        "modules": ["google.colab"],
        "devices": devices("Tesla T4", **T4),
        "host_memory_bytes": int(12.7 * GiB),
        "cpu_count": 2,
    },
    "colab_a100": {
        "env": {"COLAB_GPU": "1", "COLAB_RELEASE_TAG": "release-colab_20250115-060000_RC00"},
        "files": GCE_DMI,
        "modules": ["google.colab"],
        "devices": devices("NVIDIA A100-SXM4-40GB", **A100_40),
        "host_memory_bytes": int(83.5 * GiB),
        "cpu_count": 12,
    },
    "colab_tpu_v2": {
        "env": {"COLAB_GPU": "0", "COLAB_RELEASE_TAG": "r", "TPU_ACCELERATOR_TYPE": "v2-8"},
        "files": GCE_DMI,
        "modules": ["google.colab"],
        "devices": devices("TPU v2", 8, backend="tpu", memory_gib=7.5),
        "host_memory_bytes": 334 * GiB,
        "cpu_count": 96,
    },
    "colab_tpu_v5e": {
        "env": {"COLAB_GPU": "0", "COLAB_RELEASE_TAG": "r", "TPU_ACCELERATOR_TYPE": "v5litepod-1"},
        "files": GCE_DMI,
        "modules": ["google.colab"],
        "devices": devices("TPU v5 lite", backend="tpu", memory_gib=15.75),
        "host_memory_bytes": 47 * GiB,
        "cpu_count": 24,
    },
    "colab_cpu": {
        "env": {"COLAB_GPU": "0", "COLAB_RELEASE_TAG": "r"},
        "files": GCE_DMI,
        "modules": ["google.colab"],
        "devices": CPU,
        "host_memory_bytes": int(12.7 * GiB),
        "cpu_count": 2,
    },
    "kaggle_p100": {
        "env": {
            "KAGGLE_KERNEL_RUN_TYPE": "Interactive",
            "KAGGLE_URL_BASE": "https://www.kaggle.com",
            "KAGGLE_USER_SECRETS_TOKEN": hardware.REDACTED,
        },
        "files": GCE_DMI,
        "modules": ["kaggle_secrets"],
        "devices": devices("Tesla P100-PCIE-16GB", cc="6.0", memory_gib=15.9),
        "host_memory_bytes": 31 * GiB,
        "cpu_count": 4,
    },
    "kaggle_t4x2": {
        "env": {"KAGGLE_KERNEL_RUN_TYPE": "Batch", "KAGGLE_URL_BASE": "https://www.kaggle.com"},
        "files": GCE_DMI,
        "modules": ["kaggle_secrets"],
        "devices": devices("Tesla T4", 2, **T4),
        "host_memory_bytes": 31 * GiB,
        "cpu_count": 4,
    },
    "kaggle_tpu_v5e8": {
        "env": {"KAGGLE_KERNEL_RUN_TYPE": "Interactive", "TPU_ACCELERATOR_TYPE": "v5litepod-8"},
        "files": GCE_DMI,
        "modules": ["kaggle_secrets"],
        "devices": devices("TPU v5 lite", 8, backend="tpu", memory_gib=15.75),
        "host_memory_bytes": 188 * GiB,
        "cpu_count": 224,
    },
    # The machines scripts/lower.py lowers for (pdm_jax/hardware/targets.py).
    "gce_h100x8": TARGETS["h100x8"].fixture,
    "gce_a100_80": TARGETS["a100"].fixture,
    "gce_tpu_v5e8": TARGETS["tpu_v5e_8"].fixture,
    "gce_tpu_v4_32": TARGETS["tpu_v4_32"].fixture,
    "gce_tpu_v4_16": {  # 2 hosts x 4 chips; this is host 0's view
        "env": HOME | {"TPU_ACCELERATOR_TYPE": "v4-16", "TPU_WORKER_HOSTNAMES": "t0,t1"},
        "files": GCE_DMI,
        "devices": devices("TPU v4", 8, backend="tpu", memory_gib=30.75, processes=2),
        "process_count": 2,
        "host_memory_bytes": 400 * GiB,
        "cpu_count": 240,
    },
    "gke_a100": {
        "env": HOME | {"KUBERNETES_SERVICE_HOST": "10.0.0.1"},
        "files": GCE_DMI,
        "devices": devices("NVIDIA A100-SXM4-40GB", **A100_40),
        "host_memory_bytes": 85 * GiB,
        "cpu_count": 12,
    },
    "vertex_a100": {
        "env": HOME | {"CLOUD_ML_JOB_ID": "123456", "AIP_MODEL_DIR": "gs://bucket/model"},
        "files": GCE_DMI,
        "devices": devices("NVIDIA A100-SXM4-40GB", 2, **A100_40),
        "host_memory_bytes": 170 * GiB,
        "cpu_count": 24,
    },
    "azure_v100x4": {
        "env": HOME,
        "files": AZURE_DMI,
        "devices": devices("Tesla V100-PCIE-16GB", 4, **V100_16),
        "host_memory_bytes": 448 * GiB,
        "cpu_count": 24,
    },
    "azureml_a100": {
        "env": HOME | {"AZUREML_RUN_ID": "run_1", "AZUREML_ARM_SUBSCRIPTION": "sub"},
        "files": AZURE_DMI,
        "devices": devices("NVIDIA A100 80GB PCIe", cc="8.0", memory_gib=79.0),
        "host_memory_bytes": 216 * GiB,
        "cpu_count": 24,
    },
    "hyperv_laptop": {  # Hyper-V shares Azure's vendor string but not its asset tag
        "env": HOME,
        "files": {
            f"{DMI_DIR}/sys_vendor": "Microsoft Corporation",
            f"{DMI_DIR}/product_name": "Virtual Machine",
            f"{DMI_DIR}/chassis_asset_tag": "0000-0000-0000-0000-0000-0000-00",
        },
        "devices": CPU,
        "host_memory_bytes": 8 * GiB,
        "cpu_count": 4,
    },
    "ec2_a10g": {
        "env": HOME,
        "files": EC2_DMI,
        "devices": devices("NVIDIA A10G", cc="8.6", memory_gib=22.0),
        "host_memory_bytes": 15 * GiB,
        "cpu_count": 4,
    },
    "ec2_xen_v100x8": {  # older Xen instances: only the UUID and version say Amazon
        "env": HOME,
        "files": {
            f"{DMI_DIR}/bios_vendor": "Xen",
            f"{DMI_DIR}/product_name": "HVM domU",
            f"{DMI_DIR}/product_version": "4.11.amazon",
            f"{DMI_DIR}/product_uuid": "EC2E1916-9099-7CAF-FD21-012345678902",
        },
        "devices": devices("Tesla V100-SXM2-16GB", 8, **V100_16),
        "host_memory_bytes": 488 * GiB,
        "cpu_count": 64,
    },
    "sagemaker_a100x8": {
        "env": HOME
        | {
            "SM_CURRENT_HOST": "algo-1",
            "SM_HOSTS": '["algo-1"]',
            "TRAINING_JOB_NAME": "pdm-jax-2025-01-15",
        },
        "files": EC2_DMI,
        "modules": ["sagemaker_training"],
        "devices": devices("NVIDIA A100-SXM4-40GB", 8, **A100_40),
        "host_memory_bytes": 1152 * GiB,
        "cpu_count": 96,
    },
    "slurm_a100_2nodes": {
        "env": HOME
        | {
            "SLURM_JOB_ID": "4242",
            "SLURM_NTASKS": "2",
            "SLURM_PROCID": "0",
            "CUDA_VISIBLE_DEVICES": "0,1,2,3",
        },
        "files": {f"{DMI_DIR}/sys_vendor": "Supermicro"},
        "devices": devices("NVIDIA A100-SXM4-40GB", 8, processes=2, **A100_40),
        "process_count": 2,
        "host_memory_bytes": 512 * GiB,
        "cpu_count": 32,
    },
    "slurm_on_gce_h100": {
        "env": HOME | {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"},
        "files": GCE_DMI,
        "devices": devices("NVIDIA H100 80GB HBM3", 8, **H100),
        "host_memory_bytes": 1844 * GiB,
        "cpu_count": 208,
    },
    "laptop": {
        "env": HOME,
        "files": {f"{DMI_DIR}/sys_vendor": "LENOVO", f"{DMI_DIR}/product_name": "21CB"},
        "devices": CPU,
        "host_memory_bytes": 16 * GiB,
        "cpu_count": 8,
    },
    "container_no_dmi": {"env": {}, "devices": CPU, "host_memory_bytes": None, "cpu_count": 2},
}

# name: (environment, runtime, scheduler, backend, accelerator, devices, local devices)
EXPECTED_PLATFORM = {
    "colab_t4": ("colab", "colab-gpu", None, "gpu", "T4", 1, 1),
    "colab_a100": ("colab", "colab-gpu", None, "gpu", "A100", 1, 1),
    "colab_tpu_v2": ("colab", "colab-tpu", None, "tpu", "TPU v2", 8, 8),
    "colab_tpu_v5e": ("colab", "colab-tpu", None, "tpu", "TPU v5e", 1, 1),
    "colab_cpu": ("colab", "colab-cpu", None, "cpu", "cpu", 1, 1),
    "kaggle_p100": ("kaggle", "kaggle-gpu", None, "gpu", "P100", 1, 1),
    "kaggle_t4x2": ("kaggle", "kaggle-gpu", None, "gpu", "T4", 2, 2),
    "kaggle_tpu_v5e8": ("kaggle", "kaggle-tpu", None, "tpu", "TPU v5e", 8, 8),
    "gce_h100x8": ("gce", "gce", None, "gpu", "H100", 8, 8),
    "gce_a100_80": ("gce", "gce", None, "gpu", "A100", 1, 1),
    "gce_tpu_v5e8": ("gce", "gce", None, "tpu", "TPU v5e", 8, 8),
    "gce_tpu_v4_32": ("gce", "gce", None, "tpu", "TPU v4", 16, 4),
    "gce_tpu_v4_16": ("gce", "gce", None, "tpu", "TPU v4", 8, 4),
    "gke_a100": ("gce", "gke", None, "gpu", "A100", 1, 1),
    "vertex_a100": ("vertex", "vertex-training", None, "gpu", "A100", 2, 2),
    "azure_v100x4": ("azure", "azure-vm", None, "gpu", "V100", 4, 4),
    "azureml_a100": ("azureml", "azureml", None, "gpu", "A100", 1, 1),
    "hyperv_laptop": ("local", "local", None, "cpu", "cpu", 1, 1),
    "ec2_a10g": ("aws", "ec2", None, "gpu", "A10G", 1, 1),
    "ec2_xen_v100x8": ("aws", "ec2", None, "gpu", "V100", 8, 8),
    "sagemaker_a100x8": ("sagemaker", "sagemaker-training", None, "gpu", "A100", 8, 8),
    "slurm_a100_2nodes": ("slurm", "slurm", "slurm", "gpu", "A100", 8, 4),
    "slurm_on_gce_h100": ("gce", "gce", "slurm", "gpu", "H100", 8, 8),
    "laptop": ("local", "local", None, "cpu", "cpu", 1, 1),
    "container_no_dmi": ("local", "local", None, "cpu", "cpu", 1, 1),
}

# The TFT config, global batch 256, everything 'auto':
# name: (mesh, dtype, grad_accum, per-device batch, remat, compilation cache on, data workers)
BF16, FP32 = "bfloat16", "float32"
EXPECTED_LAYOUT = {
    "colab_t4": ((1, 1), FP32, 1, 256, (), True, 1),
    "colab_a100": ((1, 1), BF16, 1, 256, (), True, 4),
    "colab_tpu_v2": ((8, 1), BF16, 1, 32, (), True, 4),
    "colab_tpu_v5e": ((1, 1), BF16, 1, 256, (), True, 4),
    "colab_cpu": ((1, 1), FP32, 8, 32, (), False, 1),
    "kaggle_p100": ((1, 1), FP32, 1, 256, (), True, 2),
    "kaggle_t4x2": ((2, 1), FP32, 1, 128, (), True, 1),
    "kaggle_tpu_v5e8": ((8, 1), BF16, 1, 32, (), True, 4),
    "gce_h100x8": ((8, 1), BF16, 1, 32, (), True, 4),
    "gce_a100_80": ((1, 1), BF16, 1, 256, (), True, 4),
    "gce_tpu_v5e8": ((8, 1), BF16, 1, 32, (), True, 4),
    "gce_tpu_v4_32": ((16, 1), BF16, 1, 16, (), True, 4),
    "gce_tpu_v4_16": ((8, 1), BF16, 1, 32, (), True, 4),
    "gke_a100": ((1, 1), BF16, 1, 256, (), True, 4),
    "vertex_a100": ((2, 1), BF16, 1, 128, (), True, 4),
    "azure_v100x4": ((4, 1), FP32, 1, 64, (), True, 3),
    "azureml_a100": ((1, 1), BF16, 1, 256, (), True, 4),
    "hyperv_laptop": ((1, 1), FP32, 8, 32, (), False, 1),
    "ec2_a10g": ((1, 1), BF16, 1, 256, (), True, 2),
    "ec2_xen_v100x8": ((8, 1), FP32, 1, 32, (), True, 4),
    "sagemaker_a100x8": ((8, 1), BF16, 1, 32, (), True, 4),
    "slurm_a100_2nodes": ((8, 1), BF16, 1, 32, (), True, 4),
    "slurm_on_gce_h100": ((8, 1), BF16, 1, 32, (), True, 4),
    "laptop": ((1, 1), FP32, 8, 32, (), False, 1),
    "container_no_dmi": ((1, 1), FP32, 8, 32, (), False, 1),
}


def snapshot(name_or_fixture: str | dict[str, Any], **changes: Any) -> Snapshot:
    fixture = FIXTURES[name_or_fixture] if isinstance(name_or_fixture, str) else name_or_fixture
    return Snapshot.from_dict(fixture | changes)


def detected(name_or_fixture: str | dict[str, Any], **changes: Any) -> hardware.Platform:
    return hardware.detect(snapshot(name_or_fixture, **changes))


@functools.cache
def _base_config(name: str) -> Any:
    return load_config(name)


def make_config(name: str = "tft", **overrides: Any) -> Any:
    """configs/<name>.py with every hardware field 'auto', then `overrides` (a__b for a.b)."""
    config = copy.deepcopy(_base_config(name))
    values = {
        "model.remat": "auto",
        "train.grad_accum": "auto",
        "compute.mesh": "auto",
        "compute.dtype": "auto",
        "data.num_threads": "auto",
        "compute.xla_flags": "auto",
        "compute.compilation_cache": "auto",
    }
    values.update({key.replace("__", "."): value for key, value in overrides.items()})
    with config.ignore_type():
        for dotted, value in values.items():
            *parents, leaf = dotted.split(".")
            node = config
            for part in parents:
                node = node[part]
            node[leaf] = value
    return config


def test_fixtures_and_expectations_cover_the_same_environments():
    assert FIXTURES.keys() == EXPECTED_PLATFORM.keys() == EXPECTED_LAYOUT.keys()


@pytest.mark.parametrize("name", FIXTURES)
def test_detect_recognises_each_environment(name):
    found = detected(name)
    environment, runtime, scheduler, backend, accelerator, num, local = EXPECTED_PLATFORM[name]
    assert (found.environment, found.runtime, found.scheduler) == (environment, runtime, scheduler)
    assert (found.backend, found.accelerator) == (backend, accelerator)
    assert (found.num_devices, found.local_devices) == (num, local)
    assert found.device_kind == FIXTURES[name]["devices"][0]["device_kind"]
    assert found.warnings == ()


@pytest.mark.parametrize("name", FIXTURES)
def test_decide_layout_for_each_environment(name):
    found = detected(name)
    layout = hardware.decide(found, make_config("tft", train__batch_size=256))
    mesh, dtype, accum, per_device, remat, cache_on, workers = EXPECTED_LAYOUT[name]
    assert layout.mesh_shape == mesh
    assert layout.dtype == dtype
    assert (layout.global_batch, layout.grad_accum, layout.per_device_batch) == (
        256,
        accum,
        per_device,
    )
    assert layout.remat == remat
    assert (layout.compilation_cache_dir is not None) == cache_on
    if cache_on:
        assert layout.compilation_cache_dir.endswith("/.cache/pdm_jax/jax_cache")
    assert layout.data_workers == workers
    assert layout.infer_microbatch == (32 if found.backend == "cpu" else 0)
    multi_gpu = found.backend == "gpu" and found.num_devices > 1
    assert bool(layout.xla_flags) == multi_gpu
    expected_sources = {name: "auto" for name in hardware.CONFIG_KEYS} | {"global_batch": "config"}
    assert dict(layout.sources) == expected_sources
    assert layout.per_device_batch * mesh[0] * layout.grad_accum == layout.global_batch


def test_cache_dir_follows_xdg_cache_home_then_home():
    xdg = detected("gce_h100x8", env={"XDG_CACHE_HOME": "/scratch/cache", "HOME": "/home/u"})
    assert hardware.decide(xdg, make_config()).compilation_cache_dir == (
        "/scratch/cache/pdm_jax/jax_cache"
    )
    home = detected("gce_h100x8", env={"HOME": "/home/u"})
    assert hardware.decide(home, make_config()).compilation_cache_dir == (
        "/home/u/.cache/pdm_jax/jax_cache"
    )


@pytest.mark.parametrize(
    ("backend", "kind", "expected"),
    [
        ("gpu", "NVIDIA A100-SXM4-40GB", "A100"),
        ("gpu", "NVIDIA A100 80GB PCIe", "A100"),
        ("gpu", "Tesla V100-SXM2-16GB", "V100"),
        ("gpu", "NVIDIA H100 80GB HBM3", "H100"),
        ("gpu", "NVIDIA H200", "H200"),
        ("gpu", "NVIDIA GH200 480GB", "GH200"),
        ("gpu", "Tesla T4", "T4"),
        ("gpu", "NVIDIA L4", "L4"),
        ("gpu", "NVIDIA L40S", "L40S"),
        ("gpu", "NVIDIA A10G", "A10G"),
        ("gpu", "Tesla P100-PCIE-16GB", "P100"),
        ("gpu", "NVIDIA RTX A6000", "A6000"),
        ("gpu", "AMD Instinct MI300X", "MI300X"),
        ("gpu", "NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 4090"),  # unknown: kept
        ("tpu", "TPU v2", "TPU v2"),
        ("tpu", "TPU v3", "TPU v3"),
        ("tpu", "TPU v4", "TPU v4"),
        ("tpu", "TPU v5 lite", "TPU v5e"),
        ("tpu", "TPU v5", "TPU v5p"),
        ("tpu", "TPU v5p", "TPU v5p"),
        ("tpu", "TPU v6 lite", "TPU v6e"),
        ("cpu", "cpu", "cpu"),
    ],
)
def test_accelerator_names_are_normalised(backend, kind, expected):
    found = detected("laptop", devices=devices(kind, backend=backend))
    assert (found.backend, found.accelerator, found.device_kind) == (backend, expected, kind)


@pytest.mark.parametrize(
    ("cc", "expected"), [("6.0", FP32), ("7.0", FP32), ("7.5", FP32), ("8.0", BF16), ("9.0", BF16)]
)
def test_auto_dtype_needs_compute_capability_8(cc, expected):
    found = detected("laptop", devices=devices("GPU", cc=cc, memory_gib=16))
    assert hardware.decide(found, make_config()).dtype == expected


def test_auto_dtype_on_a_gpu_without_compute_capability_is_float32():
    found = detected("laptop", devices=devices("AMD Instinct MI250X", memory_gib=64))
    layout = hardware.decide(found, make_config())
    assert layout.dtype == FP32
    assert any(n.startswith("dtype: ") and "unknown" in n for n in layout.notes)


# --- memory: remat and accumulation ---------------------------------------------------------

SMALL_V100 = {"devices": devices("Tesla V100-SXM2-16GB", cc="7.0", memory_gib=16)}


def test_activation_estimate_scales_with_window_width_dtype_and_remat():
    estimate = hardware.activation_bytes_per_sample
    tft = make_config("tft")
    assert estimate(tft, FP32, remat=False) == 1_600_000
    assert estimate(tft, BF16, remat=False) == 960_000
    assert estimate(tft, FP32, remat=True) == 512_000  # measured: 496 MB of 1,552 MB
    assert estimate(make_config("tft", data__window=60), FP32, remat=False) == 3_200_000
    assert estimate(make_config("tft", model__tft__hidden=128), FP32, remat=False) == 3_200_000
    assert estimate(make_config("cnn_bilstm"), FP32, remat=False) == 250_000  # window 50
    assert estimate(make_config("cnn_bilstm", data__window=30), FP32, remat=False) == 150_000
    wide = make_config("cnn_bilstm", data__window=30, model__cnn_bilstm__channels=(128, 64))
    assert estimate(wide, FP32, remat=False) == 300_000
    lstm = make_config("cnn_bilstm", data__window=30, model__cnn_bilstm__lstm_hidden=256)
    assert estimate(lstm, BF16, remat=True) == 360_000  # remat saves the CNN-BiLSTM nothing


def test_small_gpu_large_batch_turns_on_remat_and_accumulation():
    # 16 GiB V100 (fp32): budget 8 GiB. TFT at 1.6 MB/sample fits 5368 samples, 16777 with remat.
    found = detected("laptop", **SMALL_V100)
    layout = hardware.decide(found, make_config("tft", train__batch_size=65536))
    assert layout.dtype == FP32
    assert layout.remat == ("vsn", "lstm", "attention")
    assert (layout.grad_accum, layout.per_device_batch) == (4, 16384)
    assert layout.sources["remat"] == layout.sources["grad_accum"] == "auto"
    assert any(n.startswith("remat: all blocks") and "instead of 16" in n for n in layout.notes)


def test_explicit_no_remat_needs_more_accumulation():
    found = detected("laptop", **SMALL_V100)
    config = make_config("tft", train__batch_size=65536, model__remat=())
    layout = hardware.decide(found, config)
    assert layout.remat == ()
    assert (layout.grad_accum, layout.per_device_batch) == (16, 4096)
    assert (layout.sources["remat"], layout.sources["grad_accum"]) == ("config", "auto")


def test_auto_remat_only_looks_at_an_explicit_accumulation():
    found = detected("laptop", **SMALL_V100)
    enough = make_config("tft", train__batch_size=65536, train__grad_accum="32")  # CLI string
    layout = hardware.decide(found, enough)
    assert (layout.remat, layout.grad_accum, layout.per_device_batch) == ((), 32, 2048)
    short = make_config("tft", train__batch_size=65536, train__grad_accum=2)
    layout = hardware.decide(found, short)
    assert layout.remat == ("vsn", "lstm", "attention")
    assert layout.grad_accum == 2
    assert any(n.startswith("per_device_batch:") and "may not fit" in n for n in layout.notes)


def test_cnn_never_pays_for_remat_that_saves_it_nothing():
    """Measured: remat leaves the CNN-BiLSTM's peak where it is (inside its custom-VJP scan), so
    a batch too large for the device is accumulated instead."""
    found = detected("laptop", **SMALL_V100)
    layout = hardware.decide(found, make_config("cnn_bilstm", train__batch_size=65536))
    assert (layout.remat, layout.grad_accum) == ((), 2)
    assert "remat: none, it saves this model no memory (measured)" in layout.notes
    tiny = {"devices": devices("NVIDIA A100-SXM4-40GB", cc="8.0", memory_gib=1 / 4096)}
    layout = hardware.decide(detected("laptop", **tiny), make_config("cnn_bilstm"))
    assert layout.remat == ()


def test_nothing_fits_accumulates_everything_and_says_so():
    tiny = {
        "devices": devices("NVIDIA A100-SXM4-40GB", cc="8.0", memory_gib=1 / 4096)
    }  # 128 KiB budget
    layout = hardware.decide(detected("laptop", **tiny), make_config(train__batch_size=512))
    assert (layout.grad_accum, layout.per_device_batch) == (512, 1)
    assert any("even a per-device batch of 1" in n for n in layout.notes)


def test_unknown_memory_is_assumed_and_noted():
    gpu = detected("laptop", devices=devices("NVIDIA A100-SXM4-40GB", cc="8.0"))
    assert gpu.device_memory_bytes is None
    notes = hardware.decide(gpu, make_config()).notes
    assert any(n.startswith("memory:") and "16.0 GiB" in n for n in notes)
    cpu = detected("container_no_dmi")
    notes = hardware.decide(cpu, make_config()).notes
    assert any(n.startswith("memory:") and "8.0 GiB" in n for n in notes)


def test_cpu_budget_is_shared_by_local_devices(monkeypatch):
    # 16 GiB host, 8 forced host devices: 0.25 * 16 GiB / 8 = 0.5 GiB, 335 TFT samples per device
    monkeypatch.setitem(hardware.CPU_TRAIN_MICROBATCH, "tft", 0)  # memory alone decides here
    eight = detected("laptop", devices=devices("cpu", 8, backend="cpu"))
    layout = hardware.decide(eight, make_config(train__batch_size=8 * 1024, model__remat=()))
    assert (layout.mesh_shape, layout.grad_accum, layout.per_device_batch) == ((8, 1), 4, 256)


# --- explicit values ------------------------------------------------------------------------


def test_explicit_values_win_and_are_marked_config():
    found = detected("gce_h100x8")
    config = make_config(
        "tft",
        compute__mesh=(8, 1),
        compute__dtype=FP32,
        train__grad_accum=2,
        model__remat=("vsn",),
        data__num_threads=3,
        compute__infer_microbatch=16,
        compute__xla_flags="--xla_gpu_enable_latency_hiding_scheduler=false",
        compute__compilation_cache="",
    )
    layout = hardware.decide(found, config)
    assert layout.mesh_shape == (8, 1)
    assert layout.dtype == FP32
    assert (layout.grad_accum, layout.per_device_batch) == (2, 16)
    assert layout.remat == ("vsn",)
    assert layout.data_workers == 3
    assert layout.infer_microbatch == 16
    assert layout.xla_flags == ("--xla_gpu_enable_latency_hiding_scheduler=false",)
    assert layout.compilation_cache_dir is None
    assert set(layout.sources.values()) == {"config"}
    assert layout.notes == ()


@pytest.mark.parametrize(
    ("mesh", "remat", "cache", "expected"),
    [
        ("8,1", "vsn,lstm", "~/jax-cache", ((8, 1), ("vsn", "lstm"), "jax-cache")),
        ([8, 1], "('attention',)", "gs://bucket/cache", ((8, 1), ("attention",), "gs://")),
    ],
)
def test_command_line_spellings_are_accepted(mesh, remat, cache, expected):
    config = make_config(compute__mesh=mesh, model__remat=remat, compute__compilation_cache=cache)
    layout = hardware.decide(detected("gce_h100x8"), config)
    assert layout.mesh_shape == expected[0]
    assert layout.remat == expected[1]
    assert expected[2] in layout.compilation_cache_dir
    assert "~" not in layout.compilation_cache_dir


def test_an_older_config_without_the_new_keys_means_auto():
    config = ml_collections.ConfigDict(
        {
            "model": {"name": "tft", "tft": {"hidden": 64}, "remat": ()},
            "data": {"window": 30},
            "train": {"batch_size": 512},
        }
    )
    layout = hardware.decide(detected("gce_h100x8"), config)
    assert layout.mesh_shape == (8, 1)
    assert layout.compilation_cache_dir is not None
    assert layout.sources["remat"] == "config"  # the old default: an explicit ()
    assert {k for k, v in layout.sources.items() if v == "config"} == {"global_batch", "remat"}


# --- errors ---------------------------------------------------------------------------------


def test_batch_not_divisible_by_the_devices_suggests_valid_sizes():
    with pytest.raises(ConfigError) as error:
        hardware.decide(detected("gce_h100x8"), make_config(train__batch_size=100))
    message = str(error.value)
    assert message.startswith("config.train.batch_size:")
    assert "data-parallel size 8" in message
    assert "96 or 104" in message
    with pytest.raises(ConfigError, match=r"^config\.train\.batch_size:.*valid values: 8$"):
        hardware.decide(detected("gce_h100x8"), make_config(train__batch_size=4))


@pytest.mark.parametrize("batch", [0, -8, "abc", 2.5])
def test_batch_must_be_a_positive_integer(batch):
    with pytest.raises(ConfigError, match=r"^config\.train\.batch_size:"):
        hardware.decide(detected("laptop"), make_config(train__batch_size=batch))


def test_grad_accum_must_divide_the_per_replica_batch():
    with pytest.raises(ConfigError) as error:
        hardware.decide(
            detected("gce_h100x8"), make_config(train__batch_size=256, train__grad_accum=3)
        )
    message = str(error.value)
    assert message.startswith("config.train.grad_accum:")
    assert "per-replica batch 32" in message
    assert "1, 2, 4, 8, 16, 32" in message


@pytest.mark.parametrize("accum", [0, -2, "two", "1.5", True])
def test_grad_accum_must_be_auto_or_a_positive_integer(accum):
    with pytest.raises(ConfigError, match=r"^config\.train\.grad_accum:"):
        hardware.decide(detected("laptop"), make_config(train__grad_accum=accum))


@pytest.mark.parametrize("mesh", [(4, 1), (4, 2), (8, 2), (8,), "bogus", 8, (8, 1, 1)])
def test_bad_mesh_names_the_key(mesh):
    with pytest.raises(ConfigError, match=r"^config\.compute\.mesh:.*8 devices"):
        hardware.decide(detected("gce_h100x8"), make_config(compute__mesh=mesh))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("compute.dtype", "float16"),
        ("model.remat", ("vsn", "conv")),
        ("model.remat", 3),
        ("data.num_threads", -1),
        ("data.num_threads", "many"),
        ("compute.xla_flags", "xla_gpu_foo=1"),
        ("compute.xla_flags", "--not_an_xla_flag"),
        ("compute.compilation_cache", 5),
        ("compute.infer_microbatch", -1),
        ("compute.infer_microbatch", "many"),
    ],
)
def test_other_bad_values_name_their_key(key, value):
    config = make_config(**{key.replace(".", "__"): value})
    with pytest.raises(ConfigError, match=rf"^config\.{key.replace('.', '[.]')}:"):
        hardware.decide(detected("gce_h100x8"), config)


# --- warnings -------------------------------------------------------------------------------


def test_gpu_runtime_where_jax_sees_only_cpu_is_warned():
    found = detected("colab_t4", devices=CPU)
    assert (found.backend, found.runtime) == ("cpu", "colab-cpu")
    assert len(found.warnings) == 1
    assert "jax[cuda12]" in found.warnings[0]
    layout = hardware.decide(found, make_config())
    assert any(n.startswith("platform:") and "jax[cuda12]" in n for n in layout.notes)
    assert "jax[cuda12]" in hardware.describe(found, layout)
    chosen = detected(
        "colab_t4", devices=CPU, env=FIXTURES["colab_t4"]["env"] | {"JAX_PLATFORMS": "cpu"}
    )
    assert chosen.warnings == ()


def test_tpu_runtime_where_jax_sees_only_cpu_is_warned():
    found = detected("kaggle_tpu_v5e8", devices=CPU)
    assert found.runtime == "kaggle-cpu"
    assert "jax[tpu]" in found.warnings[0]


def test_slurm_tasks_without_jax_distributed_is_warned():
    env = FIXTURES["slurm_a100_2nodes"]["env"]
    found = detected(
        "slurm_a100_2nodes", devices=devices("NVIDIA A100", 4, cc="8.0"), env=env, process_count=1
    )
    assert any("jax.distributed.initialize()" in w for w in found.warnings)


def test_empty_device_list_is_an_error():
    with pytest.raises(ValueError, match="no devices"):
        detected("laptop", devices=[])


# --- reporting ------------------------------------------------------------------------------


def test_describe_mentions_every_decision_value_source_and_reason():
    found = detected("sagemaker_a100x8")
    layout = hardware.decide(found, make_config(compute__dtype=FP32, train__batch_size=1024))
    text = hardware.describe(found, layout)
    assert "sagemaker" in text and "A100" in text and "NVIDIA A100-SXM4-40GB" in text
    lines = text.splitlines()
    for name in hardware.CONFIG_KEYS:
        (line,) = [line for line in lines if line.strip().startswith(name + " ")]
        assert layout.sources[name] in line.split()
    (dtype_line,) = [line for line in lines if line.strip().startswith("dtype ")]
    assert "float32" in dtype_line and "set by config.compute.dtype" in dtype_line
    (mesh_line,) = [line for line in lines if line.strip().startswith("mesh_shape ")]
    assert "(8, 1)" in mesh_line and "data-parallel" in mesh_line
    assert "latency_hiding" in text


def test_to_dict_is_json_and_complete():
    found = detected("gce_tpu_v4_16")
    layout = hardware.decide(found, make_config())
    data = json.loads(json.dumps(hardware.to_dict(found, layout)))
    assert data["platform"]["accelerator"] == "TPU v4"
    assert data["platform"]["local_devices"] == 4
    assert data["layout"]["mesh_shape"] == [8, 1]
    assert set(data["layout"]["sources"]) == set(hardware.CONFIG_KEYS)
    assert len(data["layout"]["notes"]) == len(layout.notes)


def test_snapshot_round_trips_through_json():
    original = snapshot("slurm_a100_2nodes")
    again = Snapshot.from_dict(json.loads(json.dumps(original.to_dict())))
    assert again == original


def test_remat_blocks_match_the_models():
    from pdm_jax.models import cnn_bilstm, tft

    assert hardware.REMAT_BLOCKS == {"tft": tft.REMAT_BLOCKS, "cnn_bilstm": cnn_bilstm.REMAT_BLOCKS}


# --- applying a layout ----------------------------------------------------------------------


def test_compiler_options_are_typed():
    layout = hardware.decide(
        detected("gce_h100x8"),
        make_config(
            compute__xla_flags="--xla_gpu_enable_latency_hiding_scheduler=true "
            "--xla_gpu_memory_limit_slop_factor=95 --xla_dump_to=/tmp/dump --xla_gpu_foo=false"
        ),
    )
    assert hardware.compiler_options(layout) == {
        "xla_gpu_enable_latency_hiding_scheduler": True,
        "xla_gpu_memory_limit_slop_factor": 95,
        "xla_dump_to": "/tmp/dump",
        "xla_gpu_foo": False,
    }


def test_apply_runtime_sets_the_compilation_cache(tmp_path):
    import jax

    cache = tmp_path / "jax_cache"
    layout = hardware.decide(
        detected("gce_h100x8"), make_config(compute__compilation_cache=str(cache))
    )
    before = jax.config.jax_compilation_cache_dir
    try:
        options = hardware.apply_runtime(layout)
        assert jax.config.jax_compilation_cache_dir == str(cache)
        assert cache.is_dir()
        assert options == {"xla_gpu_enable_latency_hiding_scheduler": True}
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


# --- the live machine -----------------------------------------------------------------------


def test_gather_on_this_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    monkeypatch.setenv("KAGGLE_USER_SECRETS_TOKEN", "s3cret")
    monkeypatch.setenv("PDM_TEST_UNRELATED", "x")
    (tmp_path / "sys_vendor").write_text("Amazon EC2\n")
    monkeypatch.setattr(snapshot_module, "_DMI_ROOT", str(tmp_path))
    live = hardware.gather()
    assert live.devices and live.cpu_count >= 1
    assert live.env["KAGGLE_USER_SECRETS_TOKEN"] == hardware.REDACTED
    assert "PDM_TEST_UNRELATED" not in live.env
    assert live.files == {f"{DMI_DIR}/sys_vendor": "Amazon EC2"}
    json.dumps(live.to_dict())
    found = hardware.detect(live)
    assert isinstance(found, hardware.Platform)
    assert found.backend == "cpu"
    assert found.environment == "kaggle"  # KAGGLE_KERNEL_RUN_TYPE says so
    layout = hardware.decide(found, make_config(train__batch_size=found.num_devices * 8))
    assert layout.dtype == FP32 and layout.compilation_cache_dir is None


def test_gather_and_detect_this_machine_as_it_is():
    found = hardware.detect(hardware.gather())
    assert found.backend == "cpu"
    assert found.environment in ("local", "gce", "aws", "azure", "slurm")
    assert hardware.decide(found, make_config()).dtype == FP32


def test_module_probe_never_imports(tmp_path, monkeypatch):
    package = tmp_path / "pdm_probe_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('imported')\n")
    (package / "sub.py").write_text("raise RuntimeError('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert snapshot_module._importable("pdm_probe_pkg.sub")
    assert not snapshot_module._importable("pdm_probe_pkg.missing")
    assert not snapshot_module._importable("pdm_no_such_package.sub")
    assert "pdm_probe_pkg" not in sys.modules


def test_infer_microbatch_chunks_only_the_tft_on_cpu():
    """Measured (docs/DESIGN.md): chunks of 32 windows double the TFT's CPU inference; the
    CNN-BiLSTM gains nothing, and accelerators want the whole batch."""
    assert hardware.decide_infer_microbatch("cpu", "tft")[:2] == (32, True)
    assert hardware.decide_infer_microbatch("cpu", "cnn_bilstm")[:2] == (0, True)
    assert hardware.decide_infer_microbatch("gpu", "tft")[:2] == (0, True)
    assert hardware.decide_infer_microbatch("tpu", "tft", "8")[:2] == (8, False)
    layout = hardware.decide(detected("laptop"), make_config("cnn_bilstm"))
    assert layout.infer_microbatch == 0


def test_cpu_trains_the_tft_in_microbatches_of_32_and_the_cnn_whole():
    """Measured (docs/DESIGN.md): the TFT's CPU train step is ~1.7x faster as accumulated
    microbatches of 32; the CNN-BiLSTM's is far slower that way. An explicit value wins."""
    laptop = detected("laptop")
    layout = hardware.decide(laptop, make_config("tft", train__batch_size=256))
    assert (layout.grad_accum, layout.per_device_batch) == (8, 32)
    assert any("microbatches of at most 32" in n for n in layout.notes)
    layout = hardware.decide(laptop, make_config("tft", train__batch_size=96))
    assert (layout.grad_accum, layout.per_device_batch) == (3, 32)
    layout = hardware.decide(laptop, make_config("tft", train__batch_size=100))
    assert (layout.grad_accum, layout.per_device_batch) == (4, 25)
    layout = hardware.decide(laptop, make_config("cnn_bilstm", train__batch_size=256))
    assert (layout.grad_accum, layout.per_device_batch) == (1, 256)
    layout = hardware.decide(laptop, make_config("tft", train__batch_size=256, train__grad_accum=1))
    assert (layout.grad_accum, layout.sources["grad_accum"]) == (1, "config")
    gpu = hardware.decide(detected("gce_h100x8"), make_config("tft", train__batch_size=256))
    assert gpu.grad_accum == 1
