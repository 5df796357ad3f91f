"""Input files for inference: their columns checked against a checkpoint's before any work,
their rows read a chunk of whole units at a time, and warnings about data the model was not
trained on.

Why checks here and not only in the model: a wrong column or unit of measure still gives numbers,
so a file is refused or warned about by name before its predictions can mislead.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator

import numpy as np
import pandas as pd

from pdm_jax.data import chunked, cmapss, features, validate
from pdm_jax.data.table import DATASET, RUL, TIME, UNIT, RunTable
from pdm_jax.errors import DataError
from pdm_jax.inference.predictor import Columns, Predictor

log = logging.getLogger(__name__)

# Scaled feature medians beyond this many half-ranges of the training data from its centre (the
# training rows scale into [-1, 1]) mean another unit or scale, not wear: degradation moves a
# C-MAPSS sensor across its training range, not 5 ranges past it.
OUT_OF_RANGE = 5.0


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
    if labels.dtype.kind == "f" and _whole(labels):
        labels = labels.astype(np.int64)
    whole = _whole(raw_time)
    table = RunTable(
        frame=out,
        settings=layout.settings,
        sensors=layout.features,
        unit_labels=labels,
        unit_dataset=np.zeros(len(labels), dtype=np.int32),
        name=name,
    )
    return Input(source, table, raw_time.astype(np.int64) if whole else raw_time)


def _whole(values: np.ndarray) -> bool:
    """Whether float values are integers that int64 holds exactly, so they read back as written
    (1e300 is whole too, but no int64)."""
    return bool(np.all(values == np.round(values)) and np.all(np.abs(values) <= 2**53))


def warn_late_start(item: Input, predictor: Predictor, starts: np.ndarray) -> bool:
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


def warn_out_of_range(
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
