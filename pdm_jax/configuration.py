"""Config checks that turn a bad value into a `ConfigError` naming the key, before any work.

ml_collections already refuses unknown keys and wrong types on the command line; this catches
values that parse but cannot work (a negative window, an unknown source, an impossible split).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from typing import Any

from pdm_jax import calibration, jsonio
from pdm_jax.data.cmapss import SUBSETS
from pdm_jax.data.sources import SOURCES
from pdm_jax.data.validate import NAN_POLICIES
from pdm_jax.errors import ConfigError

SELECT_ON = ("all", "degrading")

MODELS = ("tft", "cnn_bilstm")
SCHEDULES = ("cosine", "linear", "constant")
# The repository's configs/ (an editable install; installed elsewhere, pass a path).
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _require(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"config.{key}: expected {expected}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate(config: Any) -> None:
    """Raises ConfigError for the first impossible value."""
    data = config.data
    _require(_is_int(config.seed), "seed", "an integer", config.seed)
    _require(config.model.name in MODELS, "model.name", f"one of {MODELS}", config.model.name)
    quantiles = tuple(config.model.quantiles)
    _require(
        all(isinstance(q, float | int) and 0 < q < 1 for q in quantiles),
        "model.quantiles",
        "values strictly between 0 and 1",
        quantiles,
    )
    _require(
        0 <= config.model.dropout < 1, "model.dropout", "a value in [0, 1)", config.model.dropout
    )
    _require(
        isinstance(config.model.get("target_scale", 1.0), float | int)
        and config.model.get("target_scale", 1.0) > 0,
        "model.target_scale",
        "a number > 0",
        config.model.get("target_scale"),
    )
    _require(
        isinstance(config.model.get("target_offset", 0.0), float | int),
        "model.target_offset",
        "a number",
        config.model.get("target_offset"),
    )
    _require(
        config.model.get("point_loss", "mse") in ("mse", "huber"),
        "model.point_loss",
        "'mse' or 'huber'",
        config.model.get("point_loss"),
    )
    members = config.model.get("ensemble", 1)
    _require(
        _is_int(members) and members >= 1,
        "model.ensemble",
        "an integer >= 1 (1: a single model)",
        members,
    )
    _require(data.source in SOURCES, "data.source", f"one of {SOURCES}", data.source)
    if data.source == "cmapss":
        _require(data.subset in SUBSETS, "data.subset", f"one of {SUBSETS}", data.subset)
    if data.source == "csv":
        _require(
            len(tuple(data.paths)) > 0,
            "data.paths",
            "at least one CSV/Parquet file or glob",
            data.paths,
        )
        for key in ("unit", "time"):
            value = data.columns[key]
            _require(
                isinstance(value, str) and value != "",
                f"data.columns.{key}",
                "a column name",
                value,
            )
        sensors = data.columns.sensors
        _require(
            sensors == "auto" or (isinstance(sensors, tuple | list) and len(sensors) > 0),
            "data.columns.sensors",
            "'auto' or a non-empty tuple of column names",
            sensors,
        )
        _require(
            not (data.columns.failure and data.columns.rul),
            "data.columns.rul",
            "either columns.failure or columns.rul, not both",
            data.columns.rul,
        )
    _require(_is_int(data.window) and data.window > 0, "data.window", "an integer > 0", data.window)
    shortest = data.get("min_history", 0)
    _require(
        _is_int(shortest) and shortest >= 0,
        "data.min_history",
        "an integer >= 0 (0: full windows only)",
        shortest,
    )
    _require(_is_int(data.stride) and data.stride > 0, "data.stride", "an integer > 0", data.stride)
    baseline = data.get("baseline_cycles", 0)
    _require(
        _is_int(baseline) and baseline >= 0,
        "data.baseline_cycles",
        "an integer >= 0 (0 = off)",
        baseline,
    )
    _require(
        data.rul_cap is None or data.rul_cap >= 0,
        "data.rul_cap",
        "a number >= 0 (0 = no cap)",
        data.rul_cap,
    )
    _require(
        data.nan_policy in NAN_POLICIES,
        "data.nan_policy",
        f"one of {NAN_POLICIES}",
        data.nan_policy,
    )
    _require(
        data.condition_scaling in ("auto", True, False),
        "data.condition_scaling",
        "'auto', True or False",
        data.condition_scaling,
    )
    _require(
        0 <= data.val_fraction < 1, "data.val_fraction", "a value in [0, 1)", data.val_fraction
    )
    _require(
        data.num_threads == "auto" or (_is_int(data.num_threads) and data.num_threads >= 0),
        "data.num_threads",
        "'auto' or an integer >= 0",
        data.num_threads,
    )
    _require(
        _is_int(data.prefetch) and data.prefetch >= 0,
        "data.prefetch",
        "an integer >= 0",
        data.prefetch,
    )
    train = config.train
    _require(
        _is_int(train.batch_size) and train.batch_size > 0,
        "train.batch_size",
        "an integer > 0 (the global batch)",
        train.batch_size,
    )
    _require(
        _is_int(train.num_steps) and train.num_steps >= 0,
        "train.num_steps",
        "an integer >= 0",
        train.num_steps,
    )
    accum = train.grad_accum
    _require(
        accum == "auto"
        or (not isinstance(accum, bool) and str(accum).isdigit() and int(accum) > 0),
        "train.grad_accum",
        "'auto' or an integer > 0",
        accum,
    )
    _require(train.learning_rate > 0, "train.learning_rate", "a number > 0", train.learning_rate)
    _require(train.weight_decay >= 0, "train.weight_decay", "a number >= 0", train.weight_decay)
    _require(
        0 <= train.get("ema_decay", 0.0) < 1,
        "train.ema_decay",
        "a value in [0, 1)",
        train.ema_decay,
    )
    _require(
        train.get("input_noise", 0.0) >= 0,
        "train.input_noise",
        "a number >= 0 (0 = off)",
        train.get("input_noise"),
    )
    _require(train.clip_norm >= 0, "train.clip_norm", "a number >= 0 (0 = off)", train.clip_norm)
    _require(
        train.get("calibration", "none") in calibration.METHODS,
        "train.calibration",
        f"one of {calibration.METHODS}",
        train.get("calibration"),
    )
    _require(
        train.get("select_on", "all") in SELECT_ON,
        "train.select_on",
        f"one of {SELECT_ON}",
        train.get("select_on"),
    )
    _require(train.schedule in SCHEDULES, "train.schedule", f"one of {SCHEDULES}", train.schedule)
    for key in ("warmup_steps", "schedule_steps", "patience", "num_epochs"):
        _require(
            _is_int(train[key]) and train[key] >= 0, f"train.{key}", "an integer >= 0", train[key]
        )
    for key in ("eval_every", "log_every"):
        _require(
            _is_int(train[key]) and train[key] > 0, f"train.{key}", "an integer > 0", train[key]
        )
    remat = config.model.remat
    _require(
        remat == "auto" or isinstance(remat, tuple | list),
        "model.remat",
        "'auto' or a tuple of block names",
        remat,
    )
    ckpt = config.checkpoint
    for key in ("every_steps", "keep"):
        _require(
            _is_int(ckpt[key]) and ckpt[key] >= 0, f"checkpoint.{key}", "an integer >= 0", ckpt[key]
        )
    _require(
        not (
            ckpt.get("keep_best", True) and ckpt.every_steps and ckpt.every_steps % train.eval_every
        ),
        "checkpoint.every_steps",
        f"a multiple of train.eval_every ({train.eval_every}) while checkpoint.keep_best is on, "
        "so the best step is saved with its validation RMSE",
        ckpt.every_steps,
    )
    _require(
        ckpt.every_minutes >= 0, "checkpoint.every_minutes", "a number >= 0", ckpt.every_minutes
    )
    _require(
        config.compute.dtype in ("auto", "float32", "bfloat16"),
        "compute.dtype",
        "'auto', 'float32' or 'bfloat16'",
        config.compute.dtype,
    )
    chunk = config.compute.get("infer_microbatch", "auto")
    _require(
        chunk == "auto" or (_is_int(chunk) and chunk >= 0),
        "compute.infer_microbatch",
        "'auto' or an integer >= 0",
        chunk,
    )


def load_module(path: str | os.PathLike) -> Any:
    """Imports a Python config file by path (configs/ is not a package; any cwd works)."""
    path = os.fspath(path)
    name = "pdm_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path}: cannot load as a config file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(name_or_path: str) -> Any:
    """`get_config()` of configs/<name>.py (or of a config file path), as --config loads it."""
    path = name_or_path
    if not path.endswith(".py"):
        path = os.path.join(CONFIG_DIR, f"{name_or_path}.py")
    return load_module(path).get_config()


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train.num_steps': 10, ...}: dotted keys, as the command line names them."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changes(base: Any, config: Any) -> dict[str, Any]:
    """The dotted keys whose value in `config` differs from `base`, with the new values."""
    before, after = flatten(base.to_dict()), flatten(config.to_dict())
    return {k: v for k, v in sorted(after.items()) if k not in before or before[k] != v}


def describe(values: Mapping[str, Any]) -> str:
    """`train.num_steps=20 compute.dtype='float32'`: a config's keys in one log line, where
    config.json holds the whole config."""
    return " ".join(f"{k}={v!r}" for k, v in flatten(values).items())


def save(config: Any, workdir: str) -> str:
    """Writes the resolved config as JSON into the run directory (workdir/config.json)."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    jsonio.write_json(path, config.to_dict())
    return path
