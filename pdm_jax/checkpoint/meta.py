"""What a checkpoint step holds beside the arrays, and which config changes a resume accepts.

Why one module: the format version, the keys added since checkpoints were first written and the
keys a resumed run may change together decide whether an old checkpoint still loads and resumes
exactly; keeping them side by side keeps those decisions consistent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pdm_jax.errors import ConfigError
from pdm_jax.jsonio import flatten

# 2: meta holds `calibration` (the best parameters' conformal band, pdm_jax/calibration.py);
# format 1 checkpoints load and resume, without a band until one is fitted again.
FORMAT_VERSION = 2
STATE, META = "state", "meta"
# Config keys a resumed run may change: how long and how often, where things are stored, what
# is logged and tracked, and where the (fingerprint-checked) data lives. Hardware-resolved keys
# (compute.*, grad_accum, remat, loader threads, distributed.*) follow the machine, not the run.
RESUMABLE_CHANGES = (
    "train.num_steps",
    "train.num_epochs",
    "train.eval_every",
    "train.log_every",
    "train.tensorboard",
    "train.plots",
    "train.grad_accum",
    "train.calibration",  # fitted after each evaluation; training itself never reads it
    "checkpoint.",
    "tracking.",
    "compute.",
    "distributed.",
    "model.remat",
    "data.data_dir",
    "data.paths",
    "data.test_paths",
    "data.download",
    "data.download_url",
    "data.num_threads",
    "data.prefetch",
)
# Keys added to the config after checkpoints were first written, each with the value that does
# what the code did before the key existed: a checkpoint saved without one reads as having that
# value, so adding a key never strands a run that can still resume exactly.
ADDED_KEYS: dict[str, Any] = {
    "checkpoint.owner_timeout_s": 300.0,
    "checkpoint.take_over": False,
    "data.baseline_cycles": 0,
    "data.min_history": 0,
    "data.use_time": False,
    "model.ensemble": 1,
    "model.target_offset": 0.0,
    "train.input_noise": 0.0,
    "train.select_on": "all",
}


def with_added_keys(saved: Mapping[str, Any]) -> dict[str, Any]:
    """`saved` (a checkpoint's nested config) as a nested dict with every ADDED_KEYS key it lacks
    set: the one place an old checkpoint's missing keys get their values, so code reading a
    restored config needs no defaults of its own (which could drift from these)."""
    config = _as_dict(saved)
    for dotted, value in ADDED_KEYS.items():
        *parents, leaf = dotted.split(".")
        node = config
        for name in parents:
            node = node.setdefault(name, {})
        node.setdefault(leaf, value)
    return config


def _as_dict(value: Mapping[str, Any]) -> dict[str, Any]:
    """A nested copy, so filling keys never changes the caller's mapping."""
    return {k: _as_dict(v) if isinstance(v, Mapping) else v for k, v in value.items()}


def stamp(meta: Mapping[str, Any], step: int) -> dict[str, Any]:
    """`meta` as saved with `step`: the format version says how to read it back."""
    return {**meta, "format_version": FORMAT_VERSION, "step": step}


def check_format(uri: str, step: int, meta: Mapping[str, Any]) -> None:
    """Refuses, in one line, a step written by a newer pdm-jax than this one."""
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ConfigError(
            f"checkpoint {uri} step {step} has format {meta['format_version']}, "
            f"newer than this pdm-jax reads ({FORMAT_VERSION}); upgrade pdm-jax"
        )


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ, other than those a resume may change."""
    flat_saved, flat_now = flatten(saved), flatten(current)
    flat_saved = {**{k: v for k, v in ADDED_KEYS.items() if k in flat_now}, **flat_saved}
    keys = sorted(set(flat_saved) | set(flat_now))
    return [
        k
        for k in keys
        if _norm(flat_saved.get(k)) != _norm(flat_now.get(k))
        and not any(k == p or (p.endswith(".") and k.startswith(p)) for p in RESUMABLE_CHANGES)
    ]


def _norm(value: Any) -> Any:
    """JSON round trips turn tuples into lists; compare them as equal."""
    if isinstance(value, tuple | list):
        return [_norm(v) for v in value]
    return value
