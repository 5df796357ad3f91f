"""Start-up hardware and environment detection, and the layout for every config field left 'auto'.

One config has to run unchanged on a 2-core laptop, a Colab T4, an 8 x H100 node and a TPU slice.
The global batch is a modelling choice and stays fixed; how it is spread over the hardware (mesh,
precision, gradient accumulation, rematerialisation, input threads, XLA flags, compile cache) is
not, and guessing it by hand is where runs go wrong: an OOM after an hour, bf16 emulated on a V100,
a batch that silently does not divide over the devices. So each of those choices is made here,
once, and written to the log and run_info.json with who made it (config or auto) and why.

    detected = hardware.detect(hardware.gather())   # snapshot.py reads, detection.py is pure
    layout = hardware.decide(detected, config)      # layout.py, with memory.py
    log.info(hardware.describe(detected, layout))   # apply.py, with to_dict and apply_runtime

Detection is a pure function of a `Snapshot` because the places it must recognise (Colab, Kaggle,
Vertex AI, SageMaker, Azure ML, SLURM clusters, bare cloud VMs) are not where the tests run:
snapshots recorded there replay anywhere. Only `gather()` touches the live system.

Explicit config values always win. They are checked so an impossible layout fails at start-up
with a ConfigError naming the key, not later as an XLA shape error or an OOM.
"""

from pdm_jax.hardware.apply import apply_runtime, compiler_options, describe, to_dict
from pdm_jax.hardware.common import GiB
from pdm_jax.hardware.detection import AZURE_ASSET_TAG, Platform, detect
from pdm_jax.hardware.layout import (
    CONFIG_KEYS,
    CPU_INFER_MICROBATCH,
    Layout,
    decide,
    decide_infer_microbatch,
)
from pdm_jax.hardware.memory import (
    CPU_TRAIN_MICROBATCH,
    REMAT_BLOCKS,
    activation_bytes_per_sample,
)
from pdm_jax.hardware.snapshot import (
    DMI_DIR,
    DMI_FILES,
    PROBED_MODULES,
    REDACTED,
    DeviceInfo,
    Snapshot,
    gather,
)

__all__ = [
    "AZURE_ASSET_TAG",
    "CONFIG_KEYS",
    "CPU_INFER_MICROBATCH",
    "CPU_TRAIN_MICROBATCH",
    "DMI_DIR",
    "DMI_FILES",
    "PROBED_MODULES",
    "REDACTED",
    "REMAT_BLOCKS",
    "DeviceInfo",
    "GiB",
    "Layout",
    "Platform",
    "Snapshot",
    "activation_bytes_per_sample",
    "apply_runtime",
    "compiler_options",
    "decide",
    "decide_infer_microbatch",
    "describe",
    "detect",
    "gather",
    "to_dict",
]
