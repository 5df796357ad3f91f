"""From config.data to ready windows: load, split by unit, fit the scaler on training units,
window every split. The one call the training loop, the CLI and tests make."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any

import numpy as np

from pdm_jax.data import features, sources
from pdm_jax.data.pipeline import TrainIterator, Windows, window_ends
from pdm_jax.data.table import DATASET, TIME, UNIT, RawData, RunTable
from pdm_jax.data.validate import unit_name
from pdm_jax.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Prepared:
    raw: RawData
    scaler: features.Scaler
    train: Windows
    val: Windows | None
    test: Windows | None
    train_units: np.ndarray  # unit codes of raw.train used for training
    val_units: np.ndarray
    fingerprint: str
    inputs: tuple[str, ...]  # the model's input columns, in order (`input_names`)

    def summary(self) -> dict[str, Any]:
        """Counts a user (and the run directory) should see before training starts."""
        out: dict[str, Any] = {
            "datasets": list(self.raw.dataset_names),
            "features": list(self.scaler.features),
            "num_conditions": self.scaler.num_conditions,
            "train_units": len(self.train_units),
            "val_units": len(self.val_units),
            "train_rows": self.raw.train.num_rows,
            "train_windows": len(self.train),
            "val_windows": len(self.val) if self.val is not None else 0,
            "fingerprint": self.fingerprint,
        }
        if self.test is not None:
            out["test_units"] = self.raw.test.num_units
            out["test_windows"] = len(self.test)
            out["test_windows_padded"] = self.test.num_padded
        return out


def split_units(table: RunTable, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit-wise train/validation split (never by row), per dataset, a function of the seed."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"config.data.val_fraction must be in [0, 1), got {val_fraction}")
    train, val = [], []
    rng = np.random.default_rng([seed, 1])
    for ds in np.unique(table.unit_dataset):
        codes = np.flatnonzero(table.unit_dataset == ds)
        codes = codes[rng.permutation(len(codes))]
        n_val = round(val_fraction * len(codes))
        if val_fraction > 0 and len(codes) > 1:
            n_val = min(max(n_val, 1), len(codes) - 1)
        val.append(np.sort(codes[:n_val]))
        train.append(np.sort(codes[n_val:]))
    return np.concatenate(train), np.concatenate(val)


def fingerprint(table: RunTable) -> str:
    """Content hash of a training table (values, not paths), so a resumed run can tell whether it
    sees the same data."""
    digest = hashlib.sha256()
    for col in table.frame.columns:
        digest.update(col.encode())
        digest.update(np.ascontiguousarray(table.frame[col].to_numpy(np.float64)).tobytes())
    return digest.hexdigest()


def make_windows(
    table: RunTable,
    scaler: features.Scaler,
    rul_cap: float | None,
    window: int,
    stride: int = 1,
    mode: str = "train",
    min_history: int | None = None,
    baseline_cycles: int = 0,
) -> Windows:
    """The windows of `table`; the model's inputs are `input_names(scaler, baseline_cycles)`."""
    starts, stops = table.unit_bounds()
    row_start = np.repeat(starts, stops - starts)
    scaled = scaler.transform(table.frame)
    inputs = features.with_baseline(scaled, row_start, scaler, baseline_cycles)
    targets = features.rul_target(table, rul_cap)
    _check_float32(table, inputs, targets, input_names(scaler, baseline_cycles))
    return Windows(
        features=inputs,
        targets=targets,
        row_start=row_start,
        row_unit=table.frame[UNIT].to_numpy(np.int32),
        row_dataset=table.frame[DATASET].to_numpy(np.int32),
        row_time=table.frame[TIME].to_numpy(np.float64),
        ends=window_ends(starts, stops, window, stride, mode, min_history),
        window=window,
    )


def _check_float32(
    table: RunTable, inputs: np.ndarray, targets: np.ndarray, names: tuple[str, ...]
) -> None:
    """Finite readings can still leave float32 once scaled (a value far outside the training
    rows' range) or as an uncapped RUL; the model would then predict NaN without a word."""
    row, what = None, ""
    for start in range(0, len(inputs), features.TRANSFORM_ROWS):  # bounded temporaries
        bad = ~np.isfinite(inputs[start : start + features.TRANSFORM_ROWS])
        if bad.any():
            at, col = (int(i) for i in np.argwhere(bad)[0])
            row, what = start + at, f"input {names[col]!r} scaled to the training data's range"
            break
    if row is None and np.isinf(targets).any():
        row, what = int(np.flatnonzero(np.isinf(targets))[0]), "its remaining life (uncapped)"
    if row is not None:
        unit = table.unit_labels[int(table.frame[UNIT].iloc[row])]
        raise DataError(
            f"{table.name}: unit {unit_name(unit)} at time {table.frame[TIME].iloc[row]:g}: "
            f"{what} is beyond float32's range, which the models compute in"
        )


def feature_columns(table: RunTable, use_settings: bool, use_time: bool = False) -> tuple[str, ...]:
    """The model's input columns: sensors, plus the settings and the unit's age (its time index,
    cycles since the record began) when asked. Why age: a window of flat sensor readings looks
    the same at cycle 60 as at cycle 200, but the later one is much closer to failure."""
    columns = (*table.settings, *table.sensors) if use_settings else table.sensors
    return (*columns, TIME) if use_time else columns


def input_names(scaler: features.Scaler, baseline_cycles: int = 0) -> tuple[str, ...]:
    """The model's inputs, in order: the scaled columns, then the baseline deltas if any."""
    return (*scaler.features, *features.baseline_inputs(scaler, baseline_cycles))


def train_batches(
    prepared: Prepared, config: Any, host_index: int = 0, host_count: int = 1
) -> TrainIterator:
    """This host's share of the training stream the config asks for: global batch, seed order,
    prefetch settings ('auto' threads, unresolved by a platform layout, mean 1)."""
    threads = config.data.num_threads
    return TrainIterator(
        prepared.train,
        config.train.batch_size,
        config.seed,
        host_index=host_index,
        host_count=host_count,
        num_threads=1 if threads == "auto" else int(threads),
        prefetch=config.data.prefetch,
    )


def prepare(data_cfg: Any, seed: int, data_dir: str | None = None) -> Prepared:
    """Loads the configured data and returns train/val/test windows with the fitted scaler."""
    raw = sources.load(data_cfg, data_dir)
    train_codes, val_codes = split_units(raw.train, data_cfg.val_fraction, seed)
    train_table = raw.train.select_units(train_codes)
    feats = feature_columns(raw.train, bool(data_cfg.use_settings), bool(data_cfg.use_time))
    scaler = features.fit_scaler(train_table, feats, data_cfg.condition_scaling)
    window, stride, cap = data_cfg.window, data_cfg.stride, data_cfg.rul_cap
    shortest = data_cfg.min_history or window
    baseline = int(data_cfg.baseline_cycles)
    train = make_windows(train_table, scaler, cap, window, stride, "train", shortest, baseline)
    val = None
    if len(val_codes):
        val_table = raw.train.select_units(val_codes)
        val = make_windows(val_table, scaler, cap, window, 1, "train", shortest, baseline)
    test = None
    if raw.test is not None:
        test = make_windows(raw.test, scaler, cap, window, 1, "last", baseline_cycles=baseline)
        if test.num_padded:
            log.warning(
                "%d test unit(s) are shorter than the window (%d); they are left-padded and masked",
                test.num_padded,
                window,
            )
    if train.num_padded and shortest >= window:
        log.warning(
            "%d training unit(s) are shorter than the window (%d); each gives one padded window",
            train.num_padded,
            window,
        )
    elif train.num_padded:  # asked for (data.min_history): not a warning
        log.info(
            "%d of %d training windows have less history than the window (%d) and are "
            "left-padded and masked (data.min_history=%d)",
            train.num_padded,
            len(train),
            window,
            shortest,
        )
    return Prepared(
        raw=raw,
        scaler=scaler,
        train=train,
        val=val,
        test=test,
        train_units=train_codes,
        val_units=val_codes,
        fingerprint=fingerprint(raw.train),
        inputs=input_names(scaler, baseline),
    )
