"""Config checks that turn a bad value into a `ConfigError` naming the key, before any work.

ml_collections already refuses unknown keys and wrong types on the command line; this catches
values that parse but cannot work (a negative window, an unknown source, an impossible split).
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

from pdm_jax import calibration, jsonio, models, tracking
from pdm_jax.data.cmapss import SUBSETS
from pdm_jax.data.sources import SOURCES
from pdm_jax.data.synthetic import MAX_CONDITIONS
from pdm_jax.data.validate import FLOAT32_MAX, NAN_POLICIES
from pdm_jax.errors import ConfigError
from pdm_jax.jsonio import flatten
from pdm_jax.models.cnn_bilstm import ACTIVATIONS, POOLINGS
from pdm_jax.models.layers import REMAT_POLICIES

SELECT_ON = ("all", "degrading")
SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("auto", "float32", "bfloat16")
# Counts beyond int32 overflow JAX's default integer arrays (steps, shapes) before any memory
# check could refuse them.
INT_MAX = 2**31 - 1
# The repository's configs/ (an editable install; installed elsewhere, pass a path).
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _require(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"config.{key}: expected {expected}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """Finite and within float32, which training computes in: `--config.train.learning_rate=inf`
    (or nan, or 1e300) parses as a float, and would only turn the loss into NaN."""
    finite = _is_int(value) or (isinstance(value, float) and math.isfinite(value))
    return finite and abs(value) <= FLOAT32_MAX


def _int_from(low: int, high: int = INT_MAX) -> Callable[[Any], bool]:
    return lambda v: _is_int(v) and low <= v <= high


def _number_from(low: float, strict: bool = False) -> Callable[[Any], bool]:
    return lambda v: _is_number(v) and (v > low if strict else v >= low)


def _fraction(v: Any) -> bool:
    return _is_number(v) and 0 <= v < 1


def _one_of(options: tuple[Any, ...]) -> Callable[[Any], bool]:
    return lambda v: v in options


def _auto_or(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v == "auto" or check(v)


def _positive_count(v: Any) -> bool:
    """An int, or digits from a string override such as --config.train.grad_accum=4."""
    return not isinstance(v, bool) and str(v).isdigit() and 0 < int(v) <= INT_MAX


def _names(v: Any) -> bool:
    """A tuple (or list) of column or block names, as a config file or `"('a','b')"` gives it."""
    return isinstance(v, tuple | list) and all(isinstance(n, str) and n for n in v)


def _optional_name(v: Any) -> bool:
    return v is None or isinstance(v, str)


def _counts(v: Any) -> bool:
    return isinstance(v, tuple | list) and all(_int_from(1)(c) for c in v)


def _host_port(v: Any) -> bool:
    host, _, port = str(v).rpartition(":")
    return v is None or (isinstance(v, str) and bool(host.strip()) and port.isdigit())


# One row per key: (dotted key, check, what was expected). Checks that depend on other keys are
# in `validate` below.
RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("seed", _int_from(0), "an integer >= 0"),
    ("model.name", _one_of(models.MODEL_NAMES), f"one of {models.MODEL_NAMES}"),
    (
        "model.quantiles",
        lambda qs: all(_is_number(q) and 0 < q < 1 for q in qs) and len(set(qs)) == len(qs),
        "distinct values strictly between 0 and 1",
    ),
    ("model.dropout", _fraction, "a value in [0, 1)"),
    ("model.target_scale", _number_from(0, strict=True), "a number > 0"),
    ("model.target_offset", _is_number, "a number"),
    ("model.point_loss", _one_of(("mse", "huber")), "'mse' or 'huber'"),
    ("model.huber_delta", _number_from(0, strict=True), "a number > 0 (cycles)"),
    ("model.ensemble", _int_from(1), "an integer >= 1 (1: a single model)"),
    (
        "model.remat",
        _auto_or(_names),
        "'auto' or a tuple of block names",
    ),
    ("model.remat_policy", _one_of(tuple(REMAT_POLICIES)), f"one of {tuple(REMAT_POLICIES)}"),
    ("data.source", _one_of(SOURCES), f"one of {SOURCES}"),
    ("data.window", _int_from(1), "an integer > 0"),
    ("data.min_history", _int_from(0), "an integer >= 0 (0: full windows only)"),
    ("data.stride", _int_from(1), "an integer > 0"),
    ("data.baseline_cycles", _int_from(0), "an integer >= 0 (0 = off)"),
    (
        "data.rul_cap",
        lambda v: v is None or (_is_number(v) and v >= 0),
        "a number >= 0 (0 = no cap)",
    ),
    ("data.nan_policy", _one_of(NAN_POLICIES), f"one of {NAN_POLICIES}"),
    ("data.condition_scaling", _one_of(("auto", True, False)), "'auto', True or False"),
    ("data.val_fraction", _fraction, "a value in [0, 1)"),
    ("data.num_threads", _auto_or(_int_from(0)), "'auto' or an integer >= 0"),
    ("data.prefetch", _int_from(0), "an integer >= 0"),
    ("train.batch_size", _int_from(1), "an integer > 0 (the global batch)"),
    ("train.num_steps", _int_from(0), "an integer >= 0"),
    ("train.grad_accum", _auto_or(_positive_count), "'auto' or an integer > 0"),
    ("train.learning_rate", _number_from(0, strict=True), "a number > 0"),
    ("train.weight_decay", _number_from(0), "a number >= 0"),
    ("train.ema_decay", _fraction, "a value in [0, 1)"),
    ("train.input_noise", _number_from(0), "a number >= 0 (0 = off)"),
    ("train.clip_norm", _number_from(0), "a number >= 0 (0 = off)"),
    ("train.calibration", _one_of(calibration.METHODS), f"one of {calibration.METHODS}"),
    ("train.select_on", _one_of(SELECT_ON), f"one of {SELECT_ON}"),
    ("train.schedule", _one_of(SCHEDULES), f"one of {SCHEDULES}"),
    *(
        (f"train.{key}", _int_from(0), "an integer >= 0")
        for key in ("warmup_steps", "schedule_steps", "patience", "num_epochs")
    ),
    *((f"train.{key}", _int_from(1), "an integer > 0") for key in ("eval_every", "log_every")),
    *((f"checkpoint.{key}", _int_from(0), "an integer >= 0") for key in ("every_steps", "keep")),
    ("checkpoint.every_minutes", _number_from(0), "a number >= 0"),
    ("checkpoint.owner_timeout_s", _number_from(1), "a number of seconds >= 1"),
    ("compute.dtype", _one_of(DTYPES), "'auto', 'float32' or 'bfloat16'"),
    ("compute.infer_microbatch", _auto_or(_int_from(0)), "'auto' or an integer >= 0"),
)

CSV_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("data.paths", lambda v: _names(v) and len(v) > 0, "at least one CSV/Parquet file or glob"),
    ("data.columns.unit", lambda v: isinstance(v, str) and v != "", "a column name"),
    ("data.columns.time", lambda v: isinstance(v, str) and v != "", "a column name"),
    ("data.columns.settings", _names, "a tuple of column names"),
    (
        "data.columns.sensors",
        lambda v: v == "auto" or (_names(v) and len(v) > 0),
        "'auto' or a non-empty tuple of column names",
    ),
)

# Keys a config may leave out (their readers have defaults): checked when present.
OPTIONAL_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    *((f"model.tft.{key}", _int_from(1), "an integer > 0") for key in ("hidden", "heads")),
    ("model.tft.var_hidden", _int_from(1), "an integer > 0"),
    ("model.tft.lstm_layers", _int_from(1, 1), "1 (the only depth the TFT has)"),
    ("model.cnn_bilstm.channels", _counts, "a tuple of integers > 0 (one per conv layer)"),
    (
        "model.cnn_bilstm.dilations",
        lambda v: _int_from(1)(v) or _counts(v),
        "an integer > 0, or one per conv layer",
    ),
    *(
        (f"model.cnn_bilstm.{key}", _int_from(1), "an integer > 0")
        for key in ("kernel", "lstm_hidden", "lstm_layers", "dense")
    ),
    ("model.cnn_bilstm.activation", _one_of(tuple(ACTIVATIONS)), f"one of {tuple(ACTIVATIONS)}"),
    ("model.cnn_bilstm.pooling", _one_of(POOLINGS), f"one of {POOLINGS}"),
    ("distributed.coordinator", _host_port, "'host:port' of process 0, or unset"),
    ("distributed.num_processes", _int_from(0), "an integer >= 0 (0 = detect)"),
    ("distributed.process_id", _int_from(-1), "an integer >= -1 (-1 = detect)"),
    ("distributed.timeout_s", _int_from(0), "an integer >= 0 (seconds)"),
)
CSV_OPTIONAL_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("data.test_paths", _names, "a tuple of CSV/Parquet files or globs"),
    ("data.columns.ignore", _names, "a tuple of column names"),
    ("data.columns.failure", _optional_name, "a column name, or unset"),
    ("data.columns.rul", _optional_name, "a column name, or unset"),
)
SYNTHETIC_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("data.synthetic.num_units", _int_from(1), "an integer > 0"),
    ("data.synthetic.test_units", _int_from(0), "an integer >= 0"),
    (
        "data.synthetic.num_conditions",
        _int_from(1, MAX_CONDITIONS),
        f"an integer in [1, {MAX_CONDITIONS}]",
    ),
    ("data.synthetic.seed", _int_from(0), "an integer >= 0"),
)


def value_at(config: Any, key: str) -> Any:
    """`config`'s value at a dotted key ('train.num_steps')."""
    value = config
    for part in key.split("."):
        value = value[part]
    return value


def _check(
    config: Any, rules: tuple[tuple[str, Callable[[Any], bool], str], ...], optional: bool = False
) -> None:
    """Each rule's key against its check; a key the config lacks is skipped when `optional`, and
    otherwise an error here rather than an AttributeError deep in the run."""
    for key, ok, expected in rules:
        try:
            value = value_at(config, key)
        except (KeyError, AttributeError):
            if optional:
                continue
            raise ConfigError(f"config.{key}: missing (expected {expected})") from None
        good = ok(value)
        if not good and _is_int(value) and value > INT_MAX:
            expected = f"{expected}, at most {INT_MAX}"
        elif not good and isinstance(value, float) and abs(value) > FLOAT32_MAX:
            expected = f"{expected}, within float32's range (+-{FLOAT32_MAX:.3g})"
        _require(good, key, expected, value)


def validate(config: Any) -> None:
    """Raises ConfigError for the first impossible value."""
    _check(config, RULES)
    _check(config, OPTIONAL_RULES, optional=True)
    _check_combinations(config)
    data, ckpt = config.data, config.checkpoint
    if data.source == "cmapss":
        _require(data.subset in SUBSETS, "data.subset", f"one of {SUBSETS}", data.subset)
    if data.source == "synthetic":
        _check(config, SYNTHETIC_RULES, optional=True)
    if data.source == "csv":
        _check(config, CSV_RULES)
        _check(config, CSV_OPTIONAL_RULES, optional=True)
        _require(
            not (data.columns.failure and data.columns.rul),
            "data.columns.rul",
            "either columns.failure or columns.rul, not both",
            data.columns.rul,
        )
    tracking_uri = config.get("tracking", {}).get("mlflow_uri")
    _require(
        not tracking.credentials_in(tracking_uri),
        "tracking.mlflow_uri",
        "a URI without a password (config.json and checkpoints keep it): set "
        "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN instead",
        "<uri with a password>",
    )
    eval_every = config.train.eval_every
    _require(
        not (ckpt.keep_best and ckpt.every_steps and ckpt.every_steps % eval_every),
        "checkpoint.every_steps",
        f"a multiple of train.eval_every ({eval_every}) while checkpoint.keep_best is on, "
        "so the best step is saved with its validation RMSE",
        ckpt.every_steps,
    )


def _check_combinations(config: Any) -> None:
    """Values each fine alone that the model or the launcher cannot take together."""
    model = config.model
    tft = model.get("tft") or {}
    if model.name == "tft" and "hidden" in tft and "heads" in tft:
        _require(
            tft["hidden"] % tft["heads"] == 0,
            "model.tft.hidden",
            f"a multiple of model.tft.heads ({tft['heads']})",
            tft["hidden"],
        )
    cnn = model.get("cnn_bilstm") or {}
    dilations = cnn.get("dilations")
    if model.name == "cnn_bilstm" and isinstance(dilations, tuple | list) and "channels" in cnn:
        _require(
            len(dilations) == len(cnn["channels"]),
            "model.cnn_bilstm.dilations",
            f"one per conv layer ({len(cnn['channels'])}, as model.cnn_bilstm.channels)",
            dilations,
        )
    dist = config.get("distributed") or {}
    processes, process = dist.get("num_processes", 0), dist.get("process_id", -1)
    _require(
        not processes or process < processes,
        "distributed.process_id",
        f"-1 (detect) or below distributed.num_processes ({processes})",
        process,
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
