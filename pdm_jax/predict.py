"""Batch inference from a checkpoint alone: `predict_files(checkpoint, inputs, output)`.

A checkpoint step carries the resolved config and the fitted scaler next to the arrays, so new
histories are windowed and scaled exactly as the training run did it, without the training data
and without pickle. Inputs are C-MAPSS text files (`test_FD00x.txt`) or CSV/Parquet tables in the
training run's column layout; checks run on every input before the first prediction, and the
output appears only complete (temp file, then `os.replace`).

Prediction streams fixed-shape batches (the last one padded and masked) through one compiled
function, sharded over every local device: the same code serves a laptop CPU and an 8-GPU host.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import pandas as pd

from pdm_jax import (
    calibration,
    checkpoint,
    models,
    parallel,
    platform,
    steps,
    tablewriter,
    train,
)
from pdm_jax.calibration import Calibration
from pdm_jax.data import chunked, cmapss, dataset, features, validate
from pdm_jax.data.pipeline import Windows, eval_batches
from pdm_jax.data.table import DATASET, RUL, TIME, UNIT, RunTable
from pdm_jax.errors import ConfigError, DataError, first_line
from pdm_jax.models import layers
from pdm_jax.progress import Progress

log = logging.getLogger(__name__)

STEP_CHOICES = ("best", "latest")
INTERVALS = ("calibrated", "raw")
DEFAULT_BATCH = 1024


@dataclasses.dataclass(frozen=True)
class Columns:
    """The input columns a checkpoint's model reads, and those its training source also had.

    C-MAPSS runs read text files whose time column is 'cycle' whatever config.data.columns says
    (the C-MAPSS reader names it), so that layout is fixed; user-table runs use the config's names.
    """

    unit: str
    time: str
    settings: tuple[str, ...]
    features: tuple[str, ...]
    known: frozenset[str]  # columns the training layout had on purpose: not "extra"

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.unit, self.time, *self.settings, *self.features)))


@dataclasses.dataclass(frozen=True)
class Predictor:
    """A restored model, on a mesh over the local devices, with everything needed to window."""

    uri: str
    step: int  # the checkpoint step the parameters came from
    which: str  # 'best', 'latest' or the step number asked for
    params_step: int  # the training step the parameters are from ('best': best_step)
    config: ml_collections.ConfigDict
    scaler: features.Scaler
    columns: Columns
    spec: layers.ModelSpec
    mesh: Any
    params: Any
    predict: Any
    microbatch: int = 0  # windows per chunk of a batch, per device (0: the batch at once)
    calibrated: Calibration | None = None  # the conformal p10-p90 band of these parameters

    @property
    def window(self) -> int:
        return int(self.config.data.window)

    @property
    def baseline_cycles(self) -> int:
        return int(self.config.data.get("baseline_cycles", 0))


def quantile_column(q: float) -> str:
    """'rul_p10' for 0.1: percent, two digits when whole (0.05 -> 'rul_p05'), else as written."""
    pct = round(float(q) * 100, 6)
    return f"rul_p{int(pct):02d}" if pct.is_integer() else f"rul_p{pct:g}"


def store_uri(uri: str) -> str:
    """The store a `--checkpoint` names; a run directory means the store its run saved to."""
    if not uri:
        raise ConfigError("--checkpoint: give a checkpoint store or a run directory")
    try:
        resolved = checkpoint.resolve_uri(uri, "")
    except ConfigError as err:  # its message names the config key; here it is the flag
        raise ConfigError(
            f"--checkpoint: {str(err).removeprefix('config.checkpoint.uri: ')}"
        ) from None
    if "://" in resolved:
        return resolved
    if not os.path.exists(resolved):
        raise ConfigError(f"--checkpoint: {uri}: no such checkpoint store or run directory")
    if not os.path.isdir(resolved):
        raise ConfigError(f"--checkpoint: {uri}: expected a directory, found a file")
    store = _run_store(resolved) or resolved
    if "://" in store:
        return store
    # Checked before Orbax opens it: a store over a directory without steps prints a background
    # thread's traceback at exit, after the one-line error.
    if not os.path.isdir(store) or not any(name.isdigit() for name in os.listdir(store)):
        raise ConfigError(f"--checkpoint: no complete checkpoint in {store}")
    return store


def _run_store(workdir: str) -> str | None:
    """A run directory's store: the config.checkpoint.uri its config.json names, else its
    `checkpoints/`; None when `workdir` does not look like a run directory."""
    saved_config = os.path.join(workdir, "config.json")
    if os.path.isfile(saved_config):
        try:
            with open(saved_config) as handle:
                uri = json.load(handle).get("checkpoint", {}).get("uri")
        except (OSError, ValueError, AttributeError):
            uri = None
        if uri:
            return checkpoint.resolve_uri(uri, workdir)
    nested = os.path.join(workdir, "checkpoints")
    return nested if os.path.isdir(nested) else None


def _tuples(value: Any) -> Any:
    """JSON turned the config's tuples into lists; spec hyper-parameters must stay hashable."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def _columns(config: ml_collections.ConfigDict, scaler: features.Scaler) -> Columns:
    data = config.data
    # The model's inputs read from the file: a model fed the unit's age (data.use_time) takes it
    # from the time column, whatever the file calls it.
    read = tuple(f for f in scaler.features if f != TIME)
    if data.source == "cmapss":
        return Columns("unit", "cycle", scaler.settings, read, frozenset(cmapss.COLUMNS))
    cols = data.columns
    known = {cols.unit, cols.time, *scaler.settings, *read, *(cols.ignore or ())}
    known |= {c for c in (cols.get("failure"), cols.get("rul")) if c}
    return Columns(cols.unit, cols.time, scaler.settings, read, frozenset(known))


def _parse_step(step: str | int) -> str | int:
    if isinstance(step, int) and not isinstance(step, bool):
        return step
    text = str(step).strip().lower()
    if text in STEP_CHOICES:
        return text
    if text.isdigit():
        return int(text)
    raise ConfigError(f"--step: expected best, latest or a step number, got {step!r}")


def _mesh(devices: Sequence[Any] | None) -> Any:
    """Local devices only: each process predicts its own files, with no collective to wait on."""
    devices = list(jax.local_devices() if devices is None else devices)
    return parallel.make_mesh((len(devices), 1), devices)


@dataclasses.dataclass(frozen=True)
class Saved:
    """What a checkpoint step says about its model, read before any array is: enough to check
    inputs against it, so a bad file fails fast."""

    uri: str
    step: int  # the checkpoint step to restore
    which: str | int  # 'best', 'latest' or the step number asked for
    meta: dict[str, Any]
    config: ml_collections.ConfigDict
    scaler: features.Scaler
    columns: Columns


def _open_store(uri: str) -> checkpoint.CheckpointStore:
    try:
        return checkpoint.CheckpointStore(uri, create=False)
    except Exception as err:  # remote stores fail in many library-specific ways
        raise ConfigError(f"--checkpoint: cannot open {uri}: {first_line(err)}") from err


def read_saved(checkpoint_uri: str, step: str | int = "best") -> Saved:
    """The config, scaler and input columns of the step `step` selects (see `load`)."""
    which = _parse_step(step)
    uri = store_uri(checkpoint_uri)
    with _open_store(uri) as store:
        available = store.all_steps()
        if not available:
            raise ConfigError(f"--checkpoint: no complete checkpoint in {uri}")
        if isinstance(which, int) and which not in available:
            raise ConfigError(
                f"--step={which}: no such step in {uri} (steps: "
                f"{', '.join(map(str, sorted(available)))})"
            )
        chosen = which if isinstance(which, int) else max(available)
        meta = store.restore_meta(chosen)
    missing = [k for k in ("config", "scaler") if k not in meta]
    if missing:
        raise ConfigError(
            f"{uri} step {chosen}: checkpoint metadata lacks {', '.join(missing)}; it was not "
            "written by pdm-jax training"
        )
    values = _tuples(meta["config"])
    values["model"]["remat"] = ()  # a backward-pass setting: nothing to rematerialise here
    config = ml_collections.ConfigDict(values)
    scaler = features.Scaler.from_dict(meta["scaler"])
    return Saved(uri, chosen, which, meta, config, scaler, _columns(config, scaler))


def load(
    source: str | Saved,
    step: str | int = "best",
    dtype: str | None = None,
    devices: Sequence[Any] | None = None,
    microbatch: int | str = "auto",
    intervals: str = "calibrated",
) -> Predictor:
    """Restores one step's parameters for prediction, replicated over `devices` (default: all
    local ones).

    'best' is the best-by-validation parameters held in the latest step; 'latest' and a number are
    the parameters of that step (their Polyak average when the run used one, as its evaluation
    did). `dtype` overrides the compute dtype the run resolved (e.g. float32 for a bf16 run
    predicted on a CPU). `source` is a checkpoint URI or what `read_saved` returned (then `step` is
    ignored). `microbatch` ('auto': decided for these devices, not the training's) chunks each
    batch as config.compute.infer_microbatch does. `intervals` 'calibrated' draws the p10-p90
    band the run fitted on its validation units for these parameters (the checkpoint's
    `calibration`); 'raw' gives the model's own quantiles only (none for a point model).
    """
    if intervals not in INTERVALS:
        raise ConfigError(f"--intervals: expected one of {INTERVALS}, got {intervals!r}")
    saved = source if isinstance(source, Saved) else read_saved(source, step)
    config, scaler = saved.config, saved.scaler
    compute = dtype or config.compute.get("dtype", "float32")
    if compute == "auto":
        compute = train.resolve_dtype("auto")
    inputs = dataset.input_names(scaler, int(config.data.get("baseline_cycles", 0)))
    spec = layers.spec_from_config(
        config.model, len(inputs), int(config.data.window), dtype=compute
    )
    graphdef, host_params = models.init(spec, int(config.seed))
    optimizer, _ = train.make_optimizer(config.train, spec.ensemble)
    mesh = _mesh(devices)
    replicated = parallel.replicated(mesh)
    try:
        chunk, _, why = platform.decide_infer_microbatch(
            mesh.devices.flat[0].platform, spec.name, microbatch
        )
    except ConfigError:
        raise ConfigError(
            f"--infer_microbatch: expected 'auto' or an integer >= 0, got {microbatch!r}"
        ) from None

    def abstract(x: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated)

    # The whole state as training saved it: restoring a subset is not what the store offers,
    # and 'latest' needs the optimizer state anyway when it holds a parameter average.
    shapes = jax.tree.map(abstract, host_params)
    target = {
        "params": shapes,
        "opt_state": jax.tree.map(abstract, jax.eval_shape(optimizer.init, host_params)),
        "best_params": shapes,
    }
    with _open_store(saved.uri) as store:
        try:
            state, meta = store.restore(target, saved.step)
        except (ValueError, KeyError) as err:  # a tree or shape mismatch in Orbax
            raise ConfigError(
                f"{saved.uri} step {saved.step}: parameters do not match the model its config "
                f"describes ({first_line(err)})"
            ) from err
    if saved.which == "best":
        params = state["best_params"]
        params_step = int(meta.get("early_stopping", {}).get("best_step") or saved.step)
    else:
        params = train.eval_params(state["params"], state["opt_state"])
        params_step = saved.step
    calibrated = None
    if intervals == "calibrated":
        calibrated = _calibration(meta, params_step, saved)
    log.info(
        "%s: step %d, %s parameters (from step %d), model %s, %s on %d device(s), "
        "microbatch %d (%s)",
        saved.uri,
        saved.step,
        saved.which,
        params_step,
        spec.name,
        spec.dtype,
        mesh.devices.size,
        chunk,
        why or "set by --infer_microbatch",
    )
    return Predictor(
        uri=saved.uri,
        step=saved.step,
        which=str(saved.which),
        params_step=params_step,
        config=config,
        scaler=scaler,
        columns=saved.columns,
        spec=spec,
        mesh=mesh,
        params=params,
        predict=steps.make_predict_step(graphdef, spec, mesh, microbatch=chunk),
        microbatch=chunk,
        calibrated=calibrated,
    )


def _calibration(meta: dict[str, Any], params_step: int, saved: Saved) -> Calibration | None:
    """The checkpoint's band when it was fitted for the parameters restored; else None, said
    once: a band fitted for other parameters would claim a coverage it does not have."""
    fitted = Calibration.from_dict(meta.get("calibration"))
    if fitted is not None and fitted.step == params_step:
        log.info(
            "p10-p90 band: split-conformal, fitted on %s (%d windows) for step %d",
            fitted.source,
            sum(fitted.counts),
            fitted.step,
        )
        return fitted
    if fitted is None:
        why = (
            f"checkpoint format {meta.get('format_version', 0)} holds none (rerun "
            "--mode=eval or train with config.train.calibration='conformal')"
        )
    else:
        why = f"it was fitted for step {fitted.step}'s parameters, not step {params_step}'s"
    log.info("%s: no calibrated p10-p90 band: %s", saved.uri, why)
    return None


@dataclasses.dataclass(frozen=True)
class Source:
    """One input file whose columns were checked against the checkpoint's, before any work."""

    path: str
    kind: str  # chunked.KINDS
    layout: Columns

    @property
    def name(self) -> str:
        return validate.display_name(self.path)


@dataclasses.dataclass(frozen=True)
class Input:
    """Whole units of one input as a run table, plus how to name their units and times back."""

    source: Source
    table: RunTable
    times: np.ndarray  # [rows] the time column as the user wrote it (int when whole)


def open_source(path: str | os.PathLike, columns: Columns) -> Source:
    """Checks a file's columns (its header only) against those the checkpoint's model reads."""
    path = os.fspath(path)
    validate.require_file(path, "input file")
    kind = chunked.kind_of(path)
    layout = columns
    if kind == "text":
        layout = Columns(
            "unit", "cycle", columns.settings, columns.features, frozenset(cmapss.COLUMNS)
        )
    source = Source(path, kind, layout)
    present = chunked.header(path, kind, cmapss.COLUMNS)
    missing = [c for c in layout.required if c not in present]
    if missing:
        cmapss_names = " (C-MAPSS names, as the model was trained on C-MAPSS)" * (
            layout.known == frozenset(cmapss.COLUMNS)
        )
        raise DataError(
            f"{source.name}: missing column(s) {', '.join(map(repr, missing))}; the "
            f"checkpoint's model reads {', '.join(layout.required)}{cmapss_names}"
        )
    extra = [c for c in present if c not in layout.known]
    if extra:
        log.warning(
            "%s: ignoring %d column(s) the model does not read: %s",
            source.name,
            len(extra),
            ", ".join(map(repr, extra)),
        )
    return source


def read_chunks(
    source: Source, nan_policy: str = "error", chunk_rows: int = chunked.DEFAULT_CHUNK_ROWS
) -> Iterator[Input]:
    """The file's units, about `chunk_rows` rows at a time, each chunk checked as it is read."""
    for frame in chunked.unit_chunks(
        source.path, source.kind, source.layout.unit, chunk_rows, cmapss.COLUMNS
    ):
        yield _to_input(frame, source, nan_policy)


def _to_input(frame: pd.DataFrame, source: Source, nan_policy: str) -> Input:
    layout, name = source.layout, source.name
    if source.kind == "text":
        cmapss.check_ids(frame, name)
    numeric = [layout.time, *dict.fromkeys((*layout.settings, *layout.features))]
    frame = validate.to_numeric(frame, numeric, name)
    validate.check_units_and_time(frame, name, layout.unit, layout.time)
    frame, _ = validate.apply_nan_policy(frame, numeric[1:], nan_policy, name, layout.unit)
    codes, labels = pd.factorize(frame[layout.unit], sort=False)
    raw_time = frame[layout.time].to_numpy(np.float64)
    out = pd.DataFrame(
        {
            UNIT: codes.astype(np.int64),
            TIME: raw_time,
            DATASET: np.zeros(len(frame), dtype=np.int32),
        }
    )
    for col in dict.fromkeys((*layout.settings, *layout.features)):
        out[col] = frame[col].to_numpy(np.float64)
    out[RUL] = np.nan
    labels = np.asarray(labels)
    if labels.dtype.kind == "f" and np.all(labels == np.round(labels)):
        labels = labels.astype(np.int64)
    whole = np.all(raw_time == np.round(raw_time))
    table = RunTable(
        frame=out,
        settings=layout.settings,
        sensors=layout.features,
        unit_labels=labels,
        unit_dataset=np.zeros(len(labels), dtype=np.int32),
        name=name,
    )
    return Input(source, table, raw_time.astype(np.int64) if whole else raw_time)


def _batch_size(requested: int, num_windows: int, devices: int, microbatch: int = 0) -> int:
    """One size for every file (one compile), no bigger than needed, a multiple of `devices`
    (and of the chunks, `microbatch` per device, when it holds more than one)."""
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise ConfigError(f"--batch_size: expected an integer >= 1, got {requested!r}")
    return steps.prediction_batch_size(min(requested, max(num_windows, 1)), devices, microbatch)


def _predict_windows(
    predictor: Predictor,
    windows: Windows,
    batch_size: int,
    progress: Progress,
    warm: dict[str, float],
) -> np.ndarray:
    """[windows, Q + 1] float32: the model's outputs, then the point prediction, in window order.

    Batch k+1 is gathered on the host while batch k runs (dispatch is asynchronous); results
    are read back one batch behind.
    """
    sharding = parallel.batch_sharding(predictor.mesh)
    outputs: list[np.ndarray] = []
    pending: tuple[dict[str, jax.Array], np.ndarray] | None = None

    def collect(out: dict[str, jax.Array], valid: np.ndarray) -> None:
        pred = np.asarray(out["pred"], dtype=np.float32)
        point = np.asarray(out["point"], dtype=np.float32)[:, None]
        outputs.append(np.concatenate([pred, point], axis=1)[valid])
        if not warm:  # the first batch paid for the compile: rates after it are the steady ones
            warm.update(time=time.perf_counter(), count=int(valid.sum()))
            progress.status = f"first batch incl. compile {warm['time'] - progress.start:.1f}s"
        progress.update(int(valid.sum()))

    for batch in eval_batches(windows, batch_size):
        inputs = jax.device_put(steps.model_inputs(batch), sharding)
        out = predictor.predict(predictor.params, inputs)
        if pending is not None:
            collect(*pending)
        pending = (out, batch["valid"])
    if pending is not None:
        collect(*pending)
    width = predictor.spec.num_outputs + 1
    return np.concatenate(outputs) if outputs else np.zeros((0, width), np.float32)


def iter_predictions(
    predictor: Predictor,
    sources: Sequence[Source],
    all_steps: bool = False,
    batch_size: int = DEFAULT_BATCH,
    show_progress: bool = True,
    chunk_rows: int = chunked.DEFAULT_CHUNK_ROWS,
) -> Iterator[pd.DataFrame]:
    """Prediction frames, one per chunk of whole units, in input order: one row per unit (its
    last window), or per input row with `all_steps`. Memory follows `chunk_rows`, not the input.

    One batch shape serves every chunk (one compile): the requested size, or the windows of a
    single small input when that is fewer.
    """
    mode = "all" if all_steps else "last"
    data = predictor.config.data
    nan_policy = data.get("nan_policy", "error")
    devices = int(predictor.mesh.devices.size)
    total = None
    if all_steps:  # a window per row: the rows are the total, for an ETA on long files
        counts = [chunked.row_count(s.path, s.kind) for s in sources]
        total = None if None in counts else sum(counts)
    progress = Progress(
        total, "windows", f"predicting {predictor.spec.name}", enabled=show_progress
    )
    warm: dict[str, float] = {}
    chunk = predictor.microbatch
    size = None if len(sources) == 1 else _batch_size(batch_size, batch_size, devices, chunk)
    windows = files = 0
    try:
        for source in sources:
            short = 0
            flagged: set[str] = set()
            late_warned = False
            for item in read_chunks(source, nan_policy, chunk_rows):
                win = dataset.make_windows(
                    item.table,
                    predictor.scaler,
                    data.rul_cap,
                    predictor.window,
                    1,
                    mode,
                    baseline_cycles=predictor.baseline_cycles,
                )
                flagged |= _warn_out_of_range(item, predictor.scaler, win.features, flagged)
                starts, stops = item.table.unit_bounds()
                late_warned = late_warned or _warn_late_start(item, predictor, starts)
                short += int((stops - starts < predictor.window).sum())
                if size is None:
                    size = _batch_size(batch_size, len(win), devices, chunk)
                values = _predict_windows(predictor, win, size, progress, warm)
                windows += len(win)
                frame = pd.DataFrame(
                    {
                        "unit": item.table.unit_labels[win.row_unit[win.ends]],
                        "time": item.times[win.ends],
                        "rul_pred": values[:, -1],
                    }
                )
                table = calibration.quantile_table(
                    values[:, :-1], values[:, -1], predictor.spec.quantiles, predictor.calibrated
                )
                for q, column in table.items():
                    frame[quantile_column(q)] = column.astype(np.float32)
                if len(sources) > 1:
                    frame.insert(0, "file", source.path)
                yield frame
            files += 1
            if short:
                log.warning(
                    "%s: %d unit(s) are shorter than the window (%d steps); their windows are "
                    "left-padded and masked",
                    source.name,
                    short,
                    predictor.window,
                )
    finally:
        progress.close()
    now = time.perf_counter()
    after = windows - int(warm.get("count", 0))
    steady = f", {after / (now - warm['time']):,.0f} windows/s after the first" if after else ""
    log.info(
        "predicted %d windows from %d file(s) in %.2fs%s (batch %d over %d device(s))",
        windows,
        files,
        now - progress.start,
        steady,
        size or 0,
        devices,
    )


# Scaled feature medians beyond this many half-ranges of the training data from its centre (the
# training rows scale into [-1, 1]) mean another unit or scale, not wear: degradation moves a
# C-MAPSS sensor across its training range, not 5 ranges past it.
OUT_OF_RANGE = 5.0


def _warn_late_start(item: Input, predictor: Predictor, starts: np.ndarray) -> bool:
    """Warns when a model fed baseline inputs (data.baseline_cycles) meets units whose record
    starts later than the training units' did: their level is then not their early life's, and
    the inputs measure change from a later, more worn state than training saw. Only a model that
    also reads the age knows when training records started. `starts`: each unit's first row.
    Returns whether it warned."""
    cycles, scaler = predictor.baseline_cycles, predictor.scaler
    if cycles <= 0 or TIME not in scaler.features:
        return False
    first_trained = float(scaler.mins[:, scaler.features.index(TIME)].min())
    first = item.table.frame[TIME].to_numpy(np.float64)[starts]
    late = first > first_trained + cycles
    if not late.any():
        return False
    codes = item.table.frame[UNIT].to_numpy()[starts][late]
    labels = [str(u) for u in item.table.unit_labels[codes]]
    shown = ", ".join(labels[:5]) + (", ..." if len(labels) > 5 else "")
    log.warning(
        "%s: %d unit(s) (%s) start at time %g or later, while training records started at %g: "
        "their baseline inputs (data.baseline_cycles=%d) assume each unit's rows from the start "
        "of its record",
        item.source.name,
        len(labels),
        shown,
        float(first[late].min()),
        first_trained,
        cycles,
    )
    return True


def _warn_out_of_range(
    item: Input, scaler: features.Scaler, scaled: np.ndarray, already: set[str]
) -> set[str]:
    """Warns (once per file and column) about feature columns whose values sit far outside the
    training data's range: the typical sign of different units (degrees C for R, kPa for psia)
    or a different scaling than training saw. Returns the columns warned about."""
    if not len(scaled):
        return set()
    medians = np.median(scaled, axis=0)
    far = [
        i
        for i, col in enumerate(scaler.features)
        if abs(medians[i]) > OUT_OF_RANGE and col not in already
    ]
    if not far:
        return set()
    parts = []
    for i in far:
        col = scaler.features[i]
        raw = float(np.median(item.table.frame[col].to_numpy(np.float64)))
        low, high = float(scaler.mins[:, i].min()), float(scaler.maxs[:, i].max())
        parts.append(f"{col!r} (median {raw:.4g}, training range {low:.4g}..{high:.4g})")
    log.warning(
        "%s: %s far outside the training data's range: different units or scale than the "
        "checkpoint's training data? Predictions from them are extrapolations",
        item.source.name,
        ", ".join(parts),
    )
    return {scaler.features[i] for i in far}


def _predictions(
    checkpoint_uri: str,
    inputs: Sequence[str | os.PathLike],
    step: str | int,
    all_steps: bool,
    batch_size: int,
    dtype: str | None,
    show_progress: bool,
    devices: Sequence[Any] | None,
    chunk_rows: int,
    microbatch: int | str,
    intervals: str,
) -> Iterator[pd.DataFrame]:
    """What `predict_files` and `predict_to_file` share: the checkpoint's description and every
    input's header checked before any model loads, then the prediction frames."""
    if not inputs:
        raise ConfigError("--input: give at least one file to predict on")
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ConfigError(f"--chunk_rows: expected an integer >= 1, got {chunk_rows!r}")
    saved = read_saved(checkpoint_uri, step)
    sources = [open_source(path, saved.columns) for path in inputs]
    predictor = load(
        saved, dtype=dtype, devices=devices, microbatch=microbatch, intervals=intervals
    )
    yield from iter_predictions(
        predictor, sources, all_steps, batch_size, show_progress, chunk_rows
    )


def predict_files(
    checkpoint_uri: str,
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike | None = None,
    step: str | int = "best",
    all_steps: bool = False,
    batch_size: int = DEFAULT_BATCH,
    dtype: str | None = None,
    show_progress: bool = True,
    devices: Sequence[Any] | None = None,
    chunk_rows: int = chunked.DEFAULT_CHUNK_ROWS,
    microbatch: int | str = "auto",
    intervals: str = "calibrated",
) -> pd.DataFrame:
    """RUL predictions for every unit of `inputs` from a checkpoint (store or run directory), as
    one frame in memory; `predict_to_file` streams large inputs instead.

    Columns: `unit`, `time` (of the window's last observation), `rul_pred` (point or median) and
    `rul_pNN` per other model quantile, with `rul_p10`/`rul_p90` the calibrated band when the
    checkpoint has one (any model; `intervals='raw'`: the model's own); a leading `file` column
    when several inputs are given, since their unit ids may repeat. With `all_steps`, one row per
    input row. Writes `output` (CSV or Parquet by extension) when given. Every input's columns are
    checked before anything runs; its rows are checked as they are read.
    """
    if output is not None:
        tablewriter.table_format(output)  # refuse a bad extension before the work
    frames = _predictions(
        checkpoint_uri,
        inputs,
        step,
        all_steps,
        batch_size,
        dtype,
        show_progress,
        devices,
        chunk_rows,
        microbatch,
        intervals,
    )
    frame = pd.concat(list(frames), ignore_index=True)
    if output is not None:
        tablewriter.write_table(frame, output)
        log.info("wrote %d rows to %s", len(frame), os.fspath(output))
    return frame


def predict_to_file(
    checkpoint_uri: str,
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    step: str | int = "best",
    all_steps: bool = False,
    batch_size: int = DEFAULT_BATCH,
    dtype: str | None = None,
    show_progress: bool = True,
    devices: Sequence[Any] | None = None,
    chunk_rows: int = chunked.DEFAULT_CHUNK_ROWS,
    microbatch: int | str = "auto",
    intervals: str = "calibrated",
) -> int:
    """`predict_files`, streamed: inputs read `chunk_rows` rows at a time and predictions written
    as they come, so memory stays flat whatever the input size. The output appears only complete;
    an error part way leaves no file. Returns the rows written."""
    with tablewriter.AtomicTableWriter(output) as out:
        for frame in _predictions(
            checkpoint_uri,
            inputs,
            step,
            all_steps,
            batch_size,
            dtype,
            show_progress,
            devices,
            chunk_rows,
            microbatch,
            intervals,
        ):
            out.write(frame)
        out.commit()
    log.info("wrote %d rows to %s", out.rows, os.fspath(output))
    return out.rows
