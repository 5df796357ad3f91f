"""Start-up hardware and environment detection, and the layout for every config field left 'auto'.

One config has to run unchanged on a 2-core laptop, a Colab T4, an 8 x H100 node and a TPU slice.
The global batch is a modelling choice and stays fixed; how it is spread over the hardware (mesh,
precision, gradient accumulation, rematerialisation, input threads, XLA flags, compile cache) is
not, and guessing it by hand is where runs go wrong: an OOM after an hour, bf16 emulated on a V100,
a batch that silently does not divide over the devices. So each of those choices is made here,
once, and written to the log and run_info.json with who made it (config or auto) and why.

Detection is a pure function of a `Snapshot` because the places it must recognise (Colab, Kaggle,
Vertex AI, SageMaker, Azure ML, SLURM clusters, bare cloud VMs) are not where the tests run:
snapshots recorded there replay anywhere. Only `gather()` touches the live system, and it reads
local signals only (environment variables, DMI files, whether a module could be imported, jax's
device list). It never asks a cloud metadata server: off-cloud that hangs until a timeout, and it
never imports vendor SDKs, which are slow and have side effects.

Explicit config values always win. They are checked here so an impossible layout fails at
start-up with a ConfigError naming the key, not later as an XLA shape error or an OOM.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import importlib.util
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pdm_jax.errors import ConfigError

log = logging.getLogger(__name__)
GiB = 1 << 30

# --- what gather() reads ----------------------------------------------------------------------

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

# --- environment signals --------------------------------------------------------------------

# The asset tag Azure writes into every VM's DMI chassis record; local Hyper-V VMs share Azure's
# sys_vendor ('Microsoft Corporation') but not this tag.
AZURE_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77"
_KAGGLE_ENV = ("KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_URL_BASE", "KAGGLE_DATA_PROXY_TOKEN")
_SAGEMAKER_TRAINING_ENV = ("TRAINING_JOB_NAME", "TRAINING_JOB_ARN", "SM_TRAINING_ENV")
_SAGEMAKER_ENV = (*_SAGEMAKER_TRAINING_ENV, "SM_CURRENT_HOST", "SM_HOSTS", "SM_MODEL_DIR")
_TPU_ENV = ("COLAB_TPU_ADDR", "TPU_ACCELERATOR_TYPE", "TPU_NAME", "TPU_WORKER_HOSTNAMES")
_GPU_ENV = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS")

# Blocks each model can rematerialise (pdm_jax.models.*.REMAT_BLOCKS; a test keeps them equal).
# Repeated here so deciding a layout does not import flax.
REMAT_BLOCKS = {"tft": ("vsn", "lstm", "attention"), "cnn_bilstm": ("conv", "lstm")}


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


# --- detect: pure ---------------------------------------------------------------------------

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
        raise ValueError("platform.detect: the snapshot lists no devices (jax.devices() was empty)")
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


# --- memory estimate --------------------------------------------------------------------------

# XLA temp memory of one fp32 train step divided by its batch, measured on XLA:CPU at window 30
# with the default widths (TFT hidden 64; CNN-BiLSTM channels (64, 64), lstm_hidden 64).
_BYTES_PER_SAMPLE = {"tft": 1.6e6, "cnn_bilstm": 0.15e6}
_REF_WINDOW = 30
_REF_WIDTH = 64
# Assumptions, not measurements: bf16 halves most activations but some intermediates (reductions,
# normalisation statistics, the loss) stay fp32, hence 0.6; rematerialising every block keeps only
# block inputs/outputs for the backward pass, taken as halving the live activations.
_BF16_FACTOR = 0.6
_REMAT_FACTOR = 0.5
_DEVICE_FRACTION = 0.5  # of an accelerator's bytes_limit: params, optimizer, XLA workspace, slack
_HOST_FRACTION = 0.25  # of host memory on CPU: the dataset, Python and the OS live there too
_ASSUMED_DEVICE_MEMORY = 16 * GiB
_ASSUMED_HOST_MEMORY = 8 * GiB


def activation_bytes_per_sample(config: Any, dtype: str, remat: bool) -> int:
    """Estimated activation memory of one training sample, in bytes.

    Linear in window/30 and in width/64 from the measurements above: a first-order estimate
    (attention is quadratic in the window, small at the windows used here), good enough to choose
    remat and the accumulation count, not to predict an OOM to the byte.
    """
    name = _get(config, "model.name", "tft")
    if name not in _BYTES_PER_SAMPLE:
        raise ConfigError(
            f"config.model.name: expected one of {tuple(_BYTES_PER_SAMPLE)}, got {name!r}"
        )
    window = int(_get(config, "data.window", _REF_WINDOW))
    if name == "tft":
        width = int(_get(config, "model.tft.hidden", _REF_WIDTH))
    else:
        channels = tuple(_get(config, "model.cnn_bilstm.channels", (_REF_WIDTH,)))
        width = max((*channels, int(_get(config, "model.cnn_bilstm.lstm_hidden", _REF_WIDTH))))
    estimate = _BYTES_PER_SAMPLE[name] * (window / _REF_WINDOW) * (width / _REF_WIDTH)
    if dtype == "bfloat16":
        estimate *= _BF16_FACTOR
    if remat:
        estimate *= _REMAT_FACTOR
    return max(1, math.ceil(estimate))


def _memory_budget(platform: Platform) -> tuple[int, str | None]:
    """(bytes of activations one device may hold, a note when the memory size was assumed)."""
    if platform.backend == "cpu":
        host = platform.host_memory_bytes
        note = None
        if not host:
            host = _ASSUMED_HOST_MEMORY
            note = f"memory: host memory unknown, assumed {_size(host)}"
        return int(_HOST_FRACTION * host / max(1, platform.local_devices)), note
    memory = platform.device_memory_bytes
    note = None
    if not memory:
        memory = _ASSUMED_DEVICE_MEMORY
        note = f"memory: device memory unknown, assumed {_size(memory)} per device"
    return int(_DEVICE_FRACTION * memory), note


# --- decide ------------------------------------------------------------------------------------


def _get(config: Any, dotted: str, default: Any) -> Any:
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


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == "auto"


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _divisors(n: int) -> list[int]:
    small, large = [], []
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            small.append(d)
            if d != n // d:
                large.append(n // d)
    return small + large[::-1]


def _size(n: float) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _decide_mesh(platform: Platform, value: Any) -> tuple[tuple[int, int], bool]:
    if _is_auto(value):
        return (platform.num_devices, 1), True
    shape: Any = value
    if isinstance(value, str):
        shape = [p for p in re.split(r"[\s,()\[\]x]+", value) if p]
    dims = [_as_int(d) for d in shape] if isinstance(shape, list | tuple) else []
    data, model = (dims[0], dims[1]) if len(dims) == 2 else (None, None)
    if data is None or model != 1 or data * model != platform.num_devices:
        raise ConfigError(
            f"config.compute.mesh: expected 'auto' or (data, model) with model == 1 (the model "
            f"axis is reserved) and data * model == {platform.num_devices} devices, got {value!r}"
        )
    return (data, 1), False


def _check_batch(value: Any, data: int) -> int:
    batch = _as_int(value)
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
    if not _is_auto(value):
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


def _parse_remat(value: Any, model: str) -> tuple[str, ...] | None:
    """None for 'auto', else the validated tuple of block names."""
    if _is_auto(value):
        return None
    blocks = REMAT_BLOCKS.get(model, ())
    if isinstance(value, str):  # from a command line: "vsn,lstm" or "('vsn', 'lstm')"
        names = tuple(p for p in re.split(r"[\s,()\[\]'\"]+", value) if p)
    elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        names = tuple(value)
    else:
        raise ConfigError(
            f"config.model.remat: expected 'auto' or a tuple of block names from {blocks}, "
            f"got {value!r}"
        )
    unknown = [n for n in names if n not in blocks]
    if unknown:
        raise ConfigError(
            f"config.model.remat: unknown block(s) {', '.join(map(repr, unknown))} for "
            f"{model!r}; expected 'auto' or a tuple of {blocks}"
        )
    return names


def _parse_accum(value: Any, per_replica: int, batch: int, data: int) -> int | None:
    """None for 'auto', else the validated accumulation count."""
    if _is_auto(value):
        return None
    accum = _as_int(value)
    if accum is None or accum <= 0:
        raise ConfigError(
            f"config.train.grad_accum: expected 'auto' or an integer > 0, got {value!r}"
        )
    if per_replica % accum:
        valid = _divisors(per_replica)
        shown = ", ".join(map(str, valid[:12])) + (", ..." if len(valid) > 12 else "")
        raise ConfigError(
            f"config.train.grad_accum: {accum} does not divide the per-replica batch "
            f"{per_replica} (global batch {batch} / data-parallel size {data}); "
            f"valid values: {shown}"
        )
    return accum


# Measured with scripts/benchmark.py --what=train --grad_accum=N on the 2-core CPU (docs/DESIGN.md):
# the TFT's train step at batch 256 runs ~1.7x faster as 8 accumulated microbatches of 32, whose
# variable-selection intermediates stay in cache; the CNN-BiLSTM is ~6x slower that way (its scan
# pays per step, not per sample), so it keeps the whole batch.
CPU_TRAIN_MICROBATCH = {"tft": 32}


def _smallest_fit(per_replica: int, bytes_per_sample: int, budget: int) -> int | None:
    for accum in _divisors(per_replica):
        if (per_replica // accum) * bytes_per_sample <= budget:
            return accum
    return None


def _decide_memory(
    config: Any, platform: Platform, dtype: str, per_replica: int, batch: int, data: int
) -> tuple[tuple[str, ...], bool, int, bool, list[str]]:
    """(remat, remat_auto, grad_accum, accum_auto, notes). Remat is decided first: it buys
    memory with ~30 % more compute, accumulation with smaller, less efficient device batches."""
    model = _get(config, "model.name", "tft")
    blocks = REMAT_BLOCKS.get(model, ())
    remat = _parse_remat(_get(config, "model.remat", "auto"), model)
    accum = _parse_accum(_get(config, "train.grad_accum", "auto"), per_replica, batch, data)
    budget, budget_note = _memory_budget(platform)
    notes = [budget_note] if budget_note else []
    plain = activation_bytes_per_sample(config, dtype, remat=False)
    saved = activation_bytes_per_sample(config, dtype, remat=True)

    def fits(accum: int, bytes_per_sample: int) -> bool:
        return (per_replica // accum) * bytes_per_sample <= budget

    budget_text = f"budget {_size(budget)}/device"
    remat_auto, accum_auto = remat is None, accum is None
    if remat is None and accum is not None:  # only the given accumulation counts
        if fits(accum, plain):
            remat = ()
            notes.append(f"remat: none needed at grad_accum={accum} ({budget_text})")
        else:
            remat = blocks
            notes.append(
                f"remat: all blocks, grad_accum={accum} does not fit without ({budget_text})"
            )
    elif remat is None:
        without, with_remat = _smallest_fit(per_replica, plain, budget), None
        if without != 1:
            with_remat = _smallest_fit(per_replica, saved, budget)
        if without == 1:
            remat, accum = (), 1
            notes.append(f"remat: none needed, the whole per-replica batch fits ({budget_text})")
        elif with_remat is not None and (without is None or with_remat < without):
            remat, accum = blocks, with_remat
            instead = f"instead of {without}" if without else "where nothing fits without"
            notes.append(
                f"remat: all blocks, so grad_accum={with_remat} suffices {instead} ({budget_text})"
            )
        elif without is not None:
            remat, accum = (), without
            notes.append(f"remat: none, it would not lower grad_accum below {without}")
        else:
            remat, accum = blocks, per_replica
            notes.append("remat: all blocks, the most memory it can save")
    # Partial remat is estimated as none: over-estimating memory costs speed, not a crash.
    full = bool(blocks) and set(blocks) <= set(remat)
    per_sample = saved if full else plain
    if accum is None:
        found = _smallest_fit(per_replica, per_sample, budget)
        accum = found if found is not None else per_replica
    speed = CPU_TRAIN_MICROBATCH.get(model, 0) if platform.backend == "cpu" else 0
    if accum_auto and speed and per_replica // accum > speed and fits(accum, per_sample):
        accum = next(a for a in _divisors(per_replica) if a >= accum and per_replica // a <= speed)
        notes.append(
            f"grad_accum: CPU: {model} trains faster in microbatches of at most {speed} "
            f"(cache-sized; the same global batch and update)"
        )
    elif accum_auto:
        need = (per_replica // accum) * per_sample
        if fits(accum, per_sample):
            reason = (
                "the whole per-replica batch fits"
                if accum == 1
                else f"smallest divisor of {per_replica} that fits"
            )
            notes.append(f"grad_accum: {reason} (~{_size(need)} activations est., {budget_text})")
        else:
            notes.append(
                f"grad_accum: even a per-device batch of 1 (~{_size(per_sample)} est.) exceeds "
                f"the {budget_text}; accumulating over the whole per-replica batch, expect OOM"
            )
    elif not fits(accum, per_sample):
        notes.append(
            f"per_device_batch: ~{_size((per_replica // accum) * per_sample)} activations est. "
            f"exceed the {budget_text} at grad_accum={accum}; it may not fit"
        )
    return tuple(remat), remat_auto, accum, accum_auto, notes


def _decide_workers(platform: Platform, value: Any) -> tuple[int, bool, str]:
    if not _is_auto(value):
        workers = _as_int(value)
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
    if not _is_auto(value):
        chunk = _as_int(value)
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


_FLAG = re.compile(r"^--(xla_[a-z0-9_]+)(?:=(.*))?$")


def _decide_xla_flags(platform: Platform, value: Any) -> tuple[tuple[str, ...], bool, str]:
    if not _is_auto(value):
        if isinstance(value, str):
            flags = tuple(value.split())
        elif isinstance(value, list | tuple) and all(isinstance(f, str) for f in value):
            flags = tuple(value)
        else:
            flags = ("",)
        if not all(_FLAG.match(f) for f in flags):
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
    if not _is_auto(value):
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

    mesh, auto = _decide_mesh(platform, _get(config, "compute.mesh", "auto"))
    data = mesh[0]
    record("mesh_shape", auto, f"all {platform.num_devices} device(s) data-parallel")
    batch = _check_batch(_get(config, "train.batch_size", None), data)
    record("global_batch", False)
    dtype, auto, reason = _decide_dtype(platform, _get(config, "compute.dtype", "auto"))
    record("dtype", auto, reason)

    per_replica = batch // data
    remat, remat_auto, accum, accum_auto, memory_notes = _decide_memory(
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

    workers, auto, reason = _decide_workers(platform, _get(config, "data.num_threads", "auto"))
    record("data_workers", auto, reason)
    chunk, auto, reason = decide_infer_microbatch(
        platform.backend,
        _get(config, "model.name", "tft"),
        _get(config, "compute.infer_microbatch", "auto"),
    )
    record("infer_microbatch", auto, reason)
    flags, auto, reason = _decide_xla_flags(platform, _get(config, "compute.xla_flags", "auto"))
    record("xla_flags", auto, reason)
    cache, auto, reason = _decide_cache(platform, _get(config, "compute.compilation_cache", "auto"))
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
        f", {_size(platform.device_memory_bytes)}/device" if platform.device_memory_bytes else ""
    )
    capability = f", cc {platform.compute_capability}" if platform.compute_capability else ""
    host = _size(platform.host_memory_bytes) if platform.host_memory_bytes else "unknown"
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
        match = _FLAG.match(flag)
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
