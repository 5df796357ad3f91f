"""Prediction frames from a checkpoint and input files, in memory (`predict_files`) or streamed to
a file (`predict_to_file`), with the options both take in one `PredictOptions`.

Why streamed by chunks of whole units: a fleet's history can be far larger than memory, and a
unit's windows need all its rows, so memory follows `chunk_rows`, not the input.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd

from pdm_jax import calibration, prediction, tablewriter
from pdm_jax.data import chunked, dataset
from pdm_jax.data.pipeline import Windows
from pdm_jax.errors import ConfigError
from pdm_jax.inference.inputs import (
    Input,
    Source,
    open_source,
    read_chunks,
    warn_late_start,
    warn_out_of_range,
)
from pdm_jax.inference.predictor import Predictor, load, read_saved
from pdm_jax.progress import Progress

log = logging.getLogger(__name__)

DEFAULT_BATCH = 1024


@dataclasses.dataclass(frozen=True)
class PredictOptions:
    """How to predict, beside what and from where: one value passed down instead of a dozen
    arguments through every function. The names are `predict_files`' keyword arguments."""

    step: str | int = "best"  # 'best', 'latest' or a checkpoint step (see `load`)
    all_steps: bool = False  # a row per input row, not per unit
    batch_size: int = DEFAULT_BATCH
    dtype: str | None = None  # None: the compute dtype the run resolved
    show_progress: bool = True
    devices: Sequence[Any] | None = None  # None: every local device
    chunk_rows: int = chunked.DEFAULT_CHUNK_ROWS
    microbatch: int | str = "auto"
    intervals: str = "calibrated"  # or 'raw' (see `load`)


def quantile_column(q: float) -> str:
    """'rul_p10' for 0.1: percent, two digits when whole (0.05 -> 'rul_p05'), else as written."""
    pct = round(float(q) * 100, 6)
    return f"rul_p{int(pct):02d}" if pct.is_integer() else f"rul_p{pct:g}"


def _batch_size(requested: int, num_windows: int, devices: int, microbatch: int = 0) -> int:
    """One size for every file (one compile), no bigger than needed, a multiple of `devices`
    (and of the chunks, `microbatch` per device, when it holds more than one)."""
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise ConfigError(f"--batch_size: expected an integer >= 1, got {requested!r}")
    return prediction.prediction_batch_size(
        min(requested, max(num_windows, 1)), devices, microbatch
    )


@dataclasses.dataclass
class _Tally:
    """What a prediction run carries from chunk to chunk and file to file."""

    progress: Progress
    devices: int
    size: int | None  # the batch size; None until the first chunk of a single input sets it
    windows: int = 0
    files: int = 0
    # When the first batch, which paid for the compile, finished and its windows: rates after it
    # are the steady ones.
    warm: dict[str, float] = dataclasses.field(default_factory=dict)


def _predict_windows(
    predictor: Predictor, windows: Windows, tally: _Tally
) -> tuple[np.ndarray, np.ndarray]:
    """([windows, Q] model outputs, [windows] point predictions) float32, in window order."""
    progress, warm = tally.progress, tally.warm

    def on_batch(count: int) -> None:
        if not warm:
            warm.update(time=time.perf_counter(), count=count)
            progress.status = f"first batch incl. compile {warm['time'] - progress.start:.1f}s"
        progress.update(count)

    out = prediction.predict_windows(
        predictor.predict,
        predictor.params,
        windows,
        tally.size,
        mesh=predictor.mesh,
        on_batch=on_batch,
    )
    if not out:  # no windows, so no batch
        return np.zeros((0, predictor.spec.num_outputs), np.float32), np.zeros(0, np.float32)
    return out["pred"].astype(np.float32), out["point"].astype(np.float32)


def _frame(
    predictor: Predictor, item: Input, win: Windows, values: tuple[np.ndarray, np.ndarray]
) -> pd.DataFrame:
    """One chunk's rows: unit and time as the input wrote them, then the prediction columns."""
    pred, point = values
    frame = pd.DataFrame(
        {
            "unit": item.table.unit_labels[win.row_unit[win.ends]],
            "time": item.times[win.ends],
            "rul_pred": point,
        }
    )
    table = calibration.quantile_table(pred, point, predictor.spec.quantiles, predictor.calibrated)
    for q, column in table.items():
        frame[quantile_column(q)] = column.astype(np.float32)
    return frame


def _file_predictions(
    predictor: Predictor, source: Source, options: PredictOptions, tally: _Tally
) -> Iterator[pd.DataFrame]:
    """One input's prediction frames, chunk by chunk, with its warnings said once per file."""
    data = predictor.config.data
    mode = "all" if options.all_steps else "last"
    short = 0
    flagged: set[str] = set()
    late_warned = False
    for item in read_chunks(source, data.nan_policy, options.chunk_rows):
        win = dataset.make_windows(
            item.table,
            predictor.scaler,
            data.rul_cap,
            predictor.window,
            1,
            mode,
            baseline_cycles=predictor.baseline_cycles,
        )
        flagged |= warn_out_of_range(item, predictor.scaler, win.features, flagged)
        starts, stops = item.table.unit_bounds()
        late_warned = late_warned or warn_late_start(item, predictor, starts)
        short += int((stops - starts < predictor.window).sum())
        if tally.size is None:
            tally.size = _batch_size(
                options.batch_size, len(win), tally.devices, predictor.microbatch
            )
        values = _predict_windows(predictor, win, tally)
        tally.windows += len(win)
        yield _frame(predictor, item, win, values)
    tally.files += 1
    if short:
        log.warning(
            "%s: %d unit(s) are shorter than the window (%d steps); their windows are "
            "left-padded and masked",
            source.name,
            short,
            predictor.window,
        )


def iter_predictions(
    predictor: Predictor, sources: Sequence[Source], options: PredictOptions | None = None
) -> Iterator[pd.DataFrame]:
    """Prediction frames, one per chunk of whole units, in input order: one row per unit (its
    last window), or per input row with `options.all_steps`. Memory follows `chunk_rows`, not
    the input.

    One batch shape serves every chunk (one compile): the requested size, or the windows of a
    single small input when that is fewer.
    """
    options = options or PredictOptions()
    devices = int(predictor.mesh.devices.size)
    total = None
    if options.all_steps:  # a window per row: the rows are the total, for an ETA on long files
        counts = [chunked.row_count(s.path, s.kind) for s in sources]
        total = None if None in counts else sum(counts)
    progress = Progress(
        total, "windows", f"predicting {predictor.spec.name}", enabled=options.show_progress
    )
    size = None
    if len(sources) != 1:
        size = _batch_size(options.batch_size, options.batch_size, devices, predictor.microbatch)
    tally = _Tally(progress, devices, size)
    try:
        for source in sources:
            for frame in _file_predictions(predictor, source, options, tally):
                if len(sources) > 1:
                    frame.insert(0, "file", source.path)
                yield frame
    finally:
        progress.close()
    now = time.perf_counter()
    after = tally.windows - int(tally.warm.get("count", 0))
    steady = ""
    if after:
        steady = f", {after / (now - tally.warm['time']):,.0f} windows/s after the first"
    log.info(
        "predicted %d windows from %d file(s) in %.2fs%s (batch %d over %d device(s))",
        tally.windows,
        tally.files,
        now - progress.start,
        steady,
        tally.size or 0,
        devices,
    )


def _predictions(
    checkpoint_uri: str, inputs: Sequence[str | os.PathLike], options: PredictOptions
) -> Iterator[pd.DataFrame]:
    """What `predict_files` and `predict_to_file` share: the checkpoint's description and every
    input's header checked before any model loads, then the prediction frames."""
    if not inputs:
        raise ConfigError("--input: give at least one file to predict on")
    chunk_rows = options.chunk_rows
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ConfigError(f"--chunk_rows: expected an integer >= 1, got {chunk_rows!r}")
    saved = read_saved(checkpoint_uri, options.step)
    sources = [open_source(path, saved.columns) for path in inputs]
    predictor = load(
        saved,
        dtype=options.dtype,
        devices=options.devices,
        microbatch=options.microbatch,
        intervals=options.intervals,
    )
    yield from iter_predictions(predictor, sources, options)


def _options(options: PredictOptions | None, overrides: dict[str, Any]) -> PredictOptions:
    return dataclasses.replace(options or PredictOptions(), **overrides)


def predict_files(
    checkpoint_uri: str,
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike | None = None,
    *,
    options: PredictOptions | None = None,
    **overrides: Any,
) -> pd.DataFrame:
    """RUL predictions for every unit of `inputs` from a checkpoint (store or run directory), as
    one frame in memory; `predict_to_file` streams large inputs instead. `options`, and any
    `PredictOptions` field given by keyword (`step="latest"`, `all_steps=True`, ...), say how.

    Columns: `unit`, `time` (of the window's last observation), `rul_pred` (point or median) and
    `rul_pNN` per other model quantile, with `rul_p10`/`rul_p90` the calibrated band when the
    checkpoint has one (any model; `intervals='raw'`: the model's own); a leading `file` column
    when several inputs are given, since their unit ids may repeat. With `all_steps`, one row per
    input row. Writes `output` (CSV or Parquet by extension) when given. Every input's columns are
    checked before anything runs; its rows are checked as they are read.
    """
    options = _options(options, overrides)
    if output is not None:
        tablewriter.table_format(output)  # refuse a bad extension before the work
    frame = pd.concat(list(_predictions(checkpoint_uri, inputs, options)), ignore_index=True)
    if output is not None:
        tablewriter.write_table(frame, output)
        log.info("wrote %d rows to %s", len(frame), os.fspath(output))
    return frame


def predict_to_file(
    checkpoint_uri: str,
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    options: PredictOptions | None = None,
    **overrides: Any,
) -> int:
    """`predict_files`, streamed: inputs read `chunk_rows` rows at a time and predictions written
    as they come, so memory stays flat whatever the input size. The output appears only complete;
    an error part way leaves no file. Returns the rows written."""
    options = _options(options, overrides)
    with tablewriter.AtomicTableWriter(output) as out:
        for frame in _predictions(checkpoint_uri, inputs, options):
            out.write(frame)
        out.commit()
    log.info("wrote %d rows to %s", out.rows, os.fspath(output))
    return out.rows
