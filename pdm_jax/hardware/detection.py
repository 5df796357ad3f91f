"""What we run on, read from a Snapshot: backend, accelerator, device counts and memory, and the
environment (Colab, Kaggle, Vertex AI, SageMaker, Azure ML, SLURM, a bare cloud VM or local).

Pure: the places it must recognise are not where the tests run, so it works from a recorded
snapshot as well as from a live one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from pdm_jax.hardware.snapshot import DMI_DIR, Snapshot

# --- environment signals --------------------------------------------------------------------

# The asset tag Azure writes into every VM's DMI chassis record; local Hyper-V VMs share Azure's
# sys_vendor ('Microsoft Corporation') but not this tag.
AZURE_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77"
_KAGGLE_ENV = ("KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_URL_BASE", "KAGGLE_DATA_PROXY_TOKEN")
_SAGEMAKER_TRAINING_ENV = ("TRAINING_JOB_NAME", "TRAINING_JOB_ARN", "SM_TRAINING_ENV")
_SAGEMAKER_ENV = (*_SAGEMAKER_TRAINING_ENV, "SM_CURRENT_HOST", "SM_HOSTS", "SM_MODEL_DIR")
_TPU_ENV = ("COLAB_TPU_ADDR", "TPU_ACCELERATOR_TYPE", "TPU_NAME", "TPU_WORKER_HOSTNAMES")
_GPU_ENV = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS")


@dataclass(frozen=True)
class Platform:
    """The hardware and environment this process runs on, as decide() needs it."""

    backend: str  # 'cpu' | 'gpu' | 'tpu'
    accelerator: str  # 'cpu', 'A100', 'H100', 'V100', 'T4', ..., 'TPU v4', 'TPU v5e', ...
    device_kind: str
    compute_capability: str | None
    num_devices: int  # all processes
    local_devices: int  # this process
    process_count: int
    process_index: int
    device_memory_bytes: int | None  # smallest local device's limit
    host_memory_bytes: int | None
    cpu_count: int
    environment: str  # 'colab' | 'kaggle' | 'vertex' | 'gce' | 'azureml' | 'azure' | ...
    runtime: str  # finer label: 'colab-gpu', 'kaggle-tpu', 'gke', 'azure-vm', 'ec2', ...
    scheduler: str | None  # 'slurm' or None
    cache_home: str | None = None  # $XDG_CACHE_HOME or ~/.cache, from the snapshot's env
    warnings: tuple[str, ...] = ()  # likely misconfigurations seen while detecting


# GPU family from jax's device_kind ('NVIDIA A100-SXM4-40GB', 'Tesla V100-SXM2-16GB',
# 'NVIDIA H100 80GB HBM3', 'NVIDIA RTX A6000', 'AMD Instinct MI300X'): the first token that looks
# like a data-centre/workstation part number.
_GPU_FAMILY = re.compile(r"^(G[HB]\d{3}|[ABHLKPTV]\d{1,4}[A-Z]?|MI\d{2,3}[A-Z]?)$")
_TPU_KIND = re.compile(r"^TPU\s*v?(\d+)([a-z]*)(\s+lite)?$", re.IGNORECASE)


def _accelerator(backend: str, device_kind: str) -> str:
    if backend == "cpu":
        return "cpu"
    if backend == "tpu":
        match = _TPU_KIND.match(device_kind.strip())
        if not match:
            return device_kind
        version, suffix, lite = match.group(1), match.group(2).lower(), bool(match.group(3))
        if lite:  # jax names the efficiency chips 'lite': v5e, v6e (v4 lite is the v4i)
            return f"TPU v{version}{'i' if version == '4' else 'e'}"
        if version == "5" and not suffix:  # v5p reports itself as 'TPU v5'
            return "TPU v5p"
        return f"TPU v{version}{suffix}"
    for token in re.split(r"[\s_\-]+", device_kind):
        if _GPU_FAMILY.match(token):
            return token
    return device_kind


def _dmi(files: Mapping[str, str], name: str) -> str:
    return files.get(f"{DMI_DIR}/{name}", "").strip()


def _cloud(files: Mapping[str, str]) -> str | None:
    """The cloud whose hypervisor wrote the DMI tables: 'gce', 'azure', 'aws' or None."""
    vendor, bios = _dmi(files, "sys_vendor"), _dmi(files, "bios_vendor")
    if _dmi(files, "product_name") == "Google Compute Engine" or "Google" in (vendor, bios):
        return "gce"
    if AZURE_ASSET_TAG in (_dmi(files, "chassis_asset_tag"), _dmi(files, "board_asset_tag")):
        return "azure"
    if (
        vendor.startswith("Amazon")
        or bios.startswith("Amazon")
        or _dmi(files, "product_uuid").lower().startswith("ec2")
        or "amazon" in _dmi(files, "product_version").lower()  # Xen-based instances
    ):
        return "aws"
    return None


def _hardware_hint(env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """('tpu' | 'gpu' | None, the variable that says so): what the runtime was given."""
    for key in _TPU_ENV:
        if env.get(key):
            return "tpu", key
    if env.get("COLAB_GPU", "0") not in ("", "0"):
        return "gpu", "COLAB_GPU"
    for key in _GPU_ENV:
        if env.get(key):
            return "gpu", key
    visible = env.get("CUDA_VISIBLE_DEVICES", "")
    if re.match(r"^(\d|GPU-|MIG-)", visible):
        return "gpu", "CUDA_VISIBLE_DEVICES"
    return None, None


def _environment(snapshot: Snapshot, hardware: str) -> tuple[str, str]:
    """(environment, runtime). Managed platforms first: they run on a cloud's VMs, so the DMI
    tables alone would call a Colab runtime 'gce' and a SageMaker job 'aws'."""
    env, modules, cloud = snapshot.env, snapshot.modules, _cloud(snapshot.files)
    if any(k.startswith("COLAB_") for k in env) or ("google.colab" in modules and cloud == "gce"):
        return "colab", f"colab-{hardware}"
    if any(env.get(k) for k in _KAGGLE_ENV) or "kaggle_secrets" in modules:
        return "kaggle", f"kaggle-{hardware}"
    if any(k.startswith(("AIP_", "CLOUD_ML_")) for k in env):
        return "vertex", "vertex-training" if env.get("CLOUD_ML_JOB_ID") else "vertex"
    if any(k in env for k in _SAGEMAKER_ENV) or (
        "sagemaker_training" in modules and cloud == "aws"
    ):
        training = any(k in env for k in _SAGEMAKER_TRAINING_ENV)
        return "sagemaker", "sagemaker-training" if training else "sagemaker"
    if any(k.startswith("AZUREML_") for k in env):
        return "azureml", "azureml"
    if cloud == "gce":
        return "gce", "gke" if env.get("KUBERNETES_SERVICE_HOST") else "gce"
    if cloud == "azure":
        return "azure", "azure-vm"
    if cloud == "aws":
        return "aws", "eks" if env.get("KUBERNETES_SERVICE_HOST") else "ec2"
    if _slurm(env):
        return "slurm", "slurm"
    return "local", "local"


def _slurm(env: Mapping[str, str]) -> bool:
    return bool(env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID"))


def _platform_name(name: str) -> str:
    name = name.lower()
    return "gpu" if name in ("cuda", "rocm") else name


def _cache_home(env: Mapping[str, str]) -> str | None:
    xdg = env.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return xdg
    home = env.get("HOME", "")
    return os.path.join(home, ".cache") if home else None


def _int_env(env: Mapping[str, str], *keys: str) -> int | None:
    for key in keys:
        value = env.get(key, "")
        if value.isdigit():
            return int(value)
    return None


def detect(snapshot: Snapshot) -> Platform:
    """The Platform a snapshot describes. Pure: same snapshot, same answer."""
    if not snapshot.devices:
        raise ValueError("hardware.detect: the snapshot lists no devices (jax.devices() was empty)")
    first = snapshot.devices[0]
    backend = _platform_name(first.platform)
    local = [d for d in snapshot.devices if d.process_index == snapshot.process_index]
    num = len(snapshot.devices)
    local_count = len(local) or max(1, num // max(1, snapshot.process_count))
    memories = [d.memory_bytes for d in local or [first] if d.memory_bytes]
    env = snapshot.env

    hint, hint_key = _hardware_hint(env)
    warnings = []
    if hint in ("gpu", "tpu") and backend == "cpu":
        if env.get("JAX_PLATFORMS", "").strip().lower() != "cpu":
            package = "jax[cuda12]" if hint == "gpu" else "jax[tpu]"
            warnings.append(
                f"this runtime has a {hint.upper()} ({hint_key} is set) but jax found only CPU "
                f"devices: install {package} (pip install -U '{package}') or check JAX_PLATFORMS"
            )
        hint = None  # the label says what jax runs on once the user has been told
    environment, runtime = _environment(snapshot, hint or backend)
    scheduler = "slurm" if _slurm(env) else None
    tasks = _int_env(env, "SLURM_NTASKS", "SLURM_NPROCS")
    if scheduler and tasks and tasks > 1 and snapshot.process_count == 1:
        warnings.append(
            f"SLURM started {tasks} tasks but jax sees 1 process: call "
            "jax.distributed.initialize() before touching devices, or every task trains alone"
        )
    return Platform(
        backend=backend,
        accelerator=_accelerator(backend, first.device_kind),
        device_kind=first.device_kind,
        compute_capability=first.compute_capability,
        num_devices=num,
        local_devices=local_count,
        process_count=snapshot.process_count,
        process_index=snapshot.process_index,
        device_memory_bytes=min(memories) if memories else None,
        host_memory_bytes=snapshot.host_memory_bytes,
        cpu_count=max(1, snapshot.cpu_count),
        environment=environment,
        runtime=runtime,
        scheduler=scheduler,
        cache_home=_cache_home(env),
        warnings=tuple(warnings),
    )
