"""How much activation memory a training step needs, and the rematerialisation and gradient
accumulation that make the per-replica batch fit in what a device has.

The global batch is a modelling choice and stays fixed; these two only change how it is computed.
Both are estimated, not measured at start-up: a compile to measure would cost minutes on an
accelerator, and a first-order estimate is enough to choose between them.
"""

from __future__ import annotations

import math
import re
from typing import Any

from pdm_jax.errors import ConfigError
from pdm_jax.hardware.common import GiB, as_int, divisors, human_size, is_auto, setting
from pdm_jax.hardware.detection import Platform

# Blocks each model can rematerialise (pdm_jax.models.*.REMAT_BLOCKS; a test keeps them equal).
# Repeated here so deciding a layout does not import flax.
REMAT_BLOCKS = {"tft": ("vsn", "lstm", "attention"), "cnn_bilstm": ("conv", "lstm")}

# --- memory estimate --------------------------------------------------------------------------

# XLA temp memory of one fp32 train step divided by its batch, measured on XLA:CPU at window 30
# with the default widths (TFT hidden 64; CNN-BiLSTM channels (64, 64), lstm_hidden 64).
_BYTES_PER_SAMPLE = {"tft": 1.6e6, "cnn_bilstm": 0.15e6}
_REF_WINDOW = 30
_REF_WIDTH = 64
# An assumption, not a measurement: bf16 halves most activations but some intermediates
# (reductions, normalisation statistics, the loss) stay fp32, hence 0.6.
_BF16_FACTOR = 0.6
# Measured (`scripts/benchmark.py --model=M --batch=1024 --what=memory`, temp bytes of the
# compiled fp32 train step with every block rematerialised over without): the TFT's variable
# selection, run one variable at a time under remat, 496 MB / 1,552 MB; the CNN-BiLSTM's peak is
# inside its custom-VJP scan, which remat cannot shrink, 148.8 / 148.2 MB: no saving, so the
# layout never pays remat's compute for it.
_REMAT_FACTOR = {"tft": 0.32, "cnn_bilstm": 1.0}
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
    name = setting(config, "model.name", "tft")
    if name not in _BYTES_PER_SAMPLE:
        raise ConfigError(
            f"config.model.name: expected one of {tuple(_BYTES_PER_SAMPLE)}, got {name!r}"
        )
    window = int(setting(config, "data.window", _REF_WINDOW))
    if name == "tft":
        width = int(setting(config, "model.tft.hidden", _REF_WIDTH))
    else:
        channels = tuple(setting(config, "model.cnn_bilstm.channels", (_REF_WIDTH,)))
        width = max((*channels, int(setting(config, "model.cnn_bilstm.lstm_hidden", _REF_WIDTH))))
    estimate = _BYTES_PER_SAMPLE[name] * (window / _REF_WINDOW) * (width / _REF_WIDTH)
    if dtype == "bfloat16":
        estimate *= _BF16_FACTOR
    if remat:
        estimate *= _REMAT_FACTOR[name]
    return max(1, math.ceil(estimate))


def _memory_budget(platform: Platform) -> tuple[int, str | None]:
    """(bytes of activations one device may hold, a note when the memory size was assumed)."""
    if platform.backend == "cpu":
        host = platform.host_memory_bytes
        note = None
        if not host:
            host = _ASSUMED_HOST_MEMORY
            note = f"memory: host memory unknown, assumed {human_size(host)}"
        return int(_HOST_FRACTION * host / max(1, platform.local_devices)), note
    memory = platform.device_memory_bytes
    note = None
    if not memory:
        memory = _ASSUMED_DEVICE_MEMORY
        note = f"memory: device memory unknown, assumed {human_size(memory)} per device"
    return int(_DEVICE_FRACTION * memory), note


def _parse_remat(value: Any, model: str) -> tuple[str, ...] | None:
    """None for 'auto', else the validated tuple of block names."""
    if is_auto(value):
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
    if is_auto(value):
        return None
    accum = as_int(value)
    if accum is None or accum <= 0:
        raise ConfigError(
            f"config.train.grad_accum: expected 'auto' or an integer > 0, got {value!r}"
        )
    if per_replica % accum:
        valid = divisors(per_replica)
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
    for accum in divisors(per_replica):
        if (per_replica // accum) * bytes_per_sample <= budget:
            return accum
    return None


def decide_memory(
    config: Any, platform: Platform, dtype: str, per_replica: int, batch: int, data: int
) -> tuple[tuple[str, ...], bool, int, bool, list[str]]:
    """(remat, remat_auto, grad_accum, accum_auto, notes). Remat is decided first: it buys
    memory with ~30 % more compute, accumulation with smaller, less efficient device batches."""
    model = setting(config, "model.name", "tft")
    blocks = REMAT_BLOCKS.get(model, ())
    remat = _parse_remat(setting(config, "model.remat", "auto"), model)
    accum = _parse_accum(setting(config, "train.grad_accum", "auto"), per_replica, batch, data)
    budget, budget_note = _memory_budget(platform)
    notes = [budget_note] if budget_note else []
    plain = activation_bytes_per_sample(config, dtype, remat=False)
    saved = activation_bytes_per_sample(config, dtype, remat=True)
    remat_auto, accum_auto = remat is None, accum is None
    if remat is None:
        remat, accum, note = _auto_remat(blocks, accum, per_replica, plain, saved, budget)
        notes.append(note)
    # Partial remat is estimated as none: over-estimating memory costs speed, not a crash.
    full = bool(blocks) and set(blocks) <= set(remat)
    per_sample = saved if full else plain
    if accum_auto:
        accum, note = _auto_accum(model, platform.backend, accum, per_replica, per_sample, budget)
        notes.append(note)
    elif (per_replica // accum) * per_sample > budget:
        notes.append(
            f"per_device_batch: ~{human_size((per_replica // accum) * per_sample)} activations "
            f"est. exceed the {_budget_text(budget)} at grad_accum={accum}; it may not fit"
        )
    return tuple(remat), remat_auto, accum, accum_auto, notes


def _budget_text(budget: int) -> str:
    return f"budget {human_size(budget)}/device"


def _auto_remat(
    blocks: tuple[str, ...],
    accum: int | None,
    per_replica: int,
    plain: int,
    saved: int,
    budget: int,
) -> tuple[tuple[str, ...], int | None, str]:
    """(remat, grad_accum, note) for model.remat 'auto', given the bytes per sample without
    (`plain`) and with (`saved`) every block rematerialised. An explicit grad_accum stays and
    gets remat only if it does not fit without; otherwise remat is worth its compute only when
    it lets a smaller accumulation count fit."""
    budget_text = _budget_text(budget)
    if accum is not None:
        if (per_replica // accum) * plain <= budget:
            return (), accum, f"remat: none needed at grad_accum={accum} ({budget_text})"
        return (
            blocks,
            accum,
            f"remat: all blocks, grad_accum={accum} does not fit without ({budget_text})",
        )
    without = _smallest_fit(per_replica, plain, budget)
    if without == 1:
        return (), 1, f"remat: none needed, the whole per-replica batch fits ({budget_text})"
    if saved >= plain:
        fit = without if without is not None else per_replica
        return (), fit, "remat: none, it saves this model no memory (measured)"
    with_remat = _smallest_fit(per_replica, saved, budget)
    if with_remat is not None and (without is None or with_remat < without):
        instead = f"instead of {without}" if without else "where nothing fits without"
        return (
            blocks,
            with_remat,
            f"remat: all blocks, so grad_accum={with_remat} suffices {instead} ({budget_text})",
        )
    if without is not None:
        return (), without, f"remat: none, it would not lower grad_accum below {without}"
    return blocks, per_replica, "remat: all blocks, the most memory it can save"


def _auto_accum(
    model: str,
    backend: str,
    accum: int | None,
    per_replica: int,
    per_sample: int,
    budget: int,
) -> tuple[int, str]:
    """(grad_accum, note) for train.grad_accum 'auto'; `accum` is the count an 'auto' remat
    was chosen for, if any. On CPU the TFT is also split into cache-sized microbatches when
    memory alone would not ask for it (CPU_TRAIN_MICROBATCH)."""
    budget_text = _budget_text(budget)
    if accum is None:
        found = _smallest_fit(per_replica, per_sample, budget)
        accum = found if found is not None else per_replica
    fits = (per_replica // accum) * per_sample <= budget
    speed = CPU_TRAIN_MICROBATCH.get(model, 0) if backend == "cpu" else 0
    if speed and per_replica // accum > speed and fits:
        accum = next(a for a in divisors(per_replica) if a >= accum and per_replica // a <= speed)
        return accum, (
            f"grad_accum: CPU: {model} trains faster in microbatches of at most {speed} "
            f"(cache-sized; the same global batch and update)"
        )
    if fits:
        need = (per_replica // accum) * per_sample
        reason = (
            "the whole per-replica batch fits"
            if accum == 1
            else f"smallest divisor of {per_replica} that fits"
        )
        return accum, f"grad_accum: {reason} (~{human_size(need)} activations est., {budget_text})"
    return accum, (
        f"grad_accum: even a per-device batch of 1 (~{human_size(per_sample)} est.) exceeds "
        f"the {budget_text}; accumulating over the whole per-replica batch, expect OOM"
    )
