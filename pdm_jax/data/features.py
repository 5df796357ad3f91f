"""Features for the models: operating-condition-aware min-max scaling and the capped RUL target.

The scaler is fitted on training units only and is plain data (arrays plus JSON-able fields), so
a checkpoint carries it and inference needs no training data and no pickle. Operating conditions
are found from the settings columns without knowing the data set: a setting whose values fall into
well-separated groups (C-MAPSS FD002/FD004: 6 flight regimes) splits the data; continuous noise
(FD001) does not.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd

from pdm_jax.data.table import BASELINE_SUFFIX, RUL, TIME, RunTable
from pdm_jax.errors import DataError

# A gap between sorted distinct setting values separates two operating points when it is wider
# than GAP_SHARE of the column's range and GAP_RATIO times the median spacing of distinct values
# (quantised noise, as in FD001's settings, has evenly spaced levels and must not split). A group
# holding less than MIN_SHARE of the rows is noise, merged into the nearest real group.
GAP_SHARE = 0.05
GAP_RATIO = 20.0
MIN_SHARE = 0.01
SCALE_LOW, SCALE_HIGH = -1.0, 1.0
TRANSFORM_ROWS = 1 << 16  # rows scaled at a time (bounds the float64 temporaries)


@dataclasses.dataclass(frozen=True)
class Scaler:
    """Per-condition min-max scaling of `features`; conditions are nearest `centers` in settings
    space normalised by (`setting_low`, `setting_span`)."""

    features: tuple[str, ...]
    settings: tuple[str, ...]
    setting_low: np.ndarray  # [S]
    setting_span: np.ndarray  # [S]
    centers: np.ndarray  # [K, S], normalised settings
    mins: np.ndarray  # [K, F]
    maxs: np.ndarray  # [K, F]

    @property
    def num_conditions(self) -> int:
        return int(self.centers.shape[0])

    def conditions(self, frame: pd.DataFrame) -> np.ndarray:
        """The operating condition (0..K-1) of each row: the nearest fitted regime."""
        if self.num_conditions == 1:
            return np.zeros(len(frame), dtype=np.int32)
        out = np.empty(len(frame), np.int32)
        settings = frame[list(self.settings)].to_numpy(np.float64)
        for start in range(0, len(frame), TRANSFORM_ROWS):  # [rows, K, S] distances in blocks
            block = settings[start : start + TRANSFORM_ROWS]
            out[start : start + len(block)] = self.condition_of(block)
        return out

    def condition_of(self, settings: Any, xp: Any = np) -> Any:
        """The condition of each row of raw `settings` [..., S]; `xp` numpy, or jax.numpy inside
        an exported model (the one formula for both)."""
        if self.num_conditions == 1:
            return xp.zeros(settings.shape[:-1], dtype=xp.int32)
        norm = (settings - xp.asarray(self.setting_low)) / xp.asarray(self.setting_span)
        dist = ((norm[..., None, :] - xp.asarray(self.centers)) ** 2).sum(-1)
        return dist.argmin(axis=-1)

    def scale(self, values: Any, cond: Any, xp: Any = np) -> Any:
        """Raw feature values [..., F] of rows in conditions `cond` [...], scaled."""
        lo, hi = xp.asarray(self.mins)[cond], xp.asarray(self.maxs)[cond]
        span = xp.where(hi > lo, hi - lo, 1.0)
        return (values - lo) / span * (SCALE_HIGH - SCALE_LOW) + SCALE_LOW

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        """Scaled features [rows, F] as float32; training rows land in [-1, 1]."""
        missing = [c for c in self.features if c not in frame.columns]
        if missing:
            raise DataError(f"input lacks feature column(s) {', '.join(map(repr, missing))}")
        out = np.empty((len(frame), len(self.features)), np.float32)
        # In blocks of rows: the float64 temporaries of a whole table (values, per-row ranges,
        # conditions) were ~10x the float32 result at the peak of data preparation. Row-wise
        # arithmetic, so the result is the same to the bit.
        for start in range(0, len(frame), TRANSFORM_ROWS):
            part = frame.iloc[start : start + TRANSFORM_ROWS]
            values = part[list(self.features)].to_numpy(np.float64)
            out[start : start + len(part)] = self.scale(values, self.conditions(part))
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for checkpoints and run directories."""
        return {
            "features": list(self.features),
            "settings": list(self.settings),
            "setting_low": self.setting_low.tolist(),
            "setting_span": self.setting_span.tolist(),
            "centers": self.centers.tolist(),
            "mins": self.mins.tolist(),
            "maxs": self.maxs.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scaler:
        settings = tuple(data["settings"])
        features = tuple(data["features"])
        return cls(
            features=features,
            settings=settings,
            setting_low=np.asarray(data["setting_low"], np.float64).reshape(len(settings)),
            setting_span=np.asarray(data["setting_span"], np.float64).reshape(len(settings)),
            centers=np.asarray(data["centers"], np.float64).reshape(-1, len(settings)),
            mins=np.asarray(data["mins"], np.float64).reshape(-1, len(features)),
            maxs=np.asarray(data["maxs"], np.float64).reshape(-1, len(features)),
        )


def _split_column(values: np.ndarray) -> np.ndarray:
    """Group ids along one setting: breaks at gaps wider than GAP_SHARE of the range."""
    lo, hi = values.min(), values.max()
    if not hi > lo:
        return np.zeros(len(values), dtype=np.int64)
    uniq = np.unique(values)
    gaps = np.diff(uniq)
    wide = (gaps > GAP_SHARE * (hi - lo)) & (gaps > GAP_RATIO * np.median(gaps))
    breaks = uniq[1:][wide]
    return np.searchsorted(breaks, values, side="right")


def find_conditions(
    settings: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Operating regimes in `settings` [rows, S]: (low, span, centers in normalised space)."""
    if settings.shape[1] == 0:
        return np.zeros(0), np.ones(0), np.zeros((1, 0))
    low = settings.min(axis=0)
    span = settings.max(axis=0) - low
    span = np.where(span > 0, span, 1.0)
    norm = (settings - low) / span
    groups = np.stack([_split_column(settings[:, j]) for j in range(settings.shape[1])], axis=1)
    # One integer per row, mixed-radix over the columns: its numeric order is the rows'
    # lexicographic order, so this is np.unique(groups, axis=0) without its slow row sort.
    code = np.zeros(len(groups), np.int64)
    for j, radix in enumerate(groups.max(axis=0) + 1):
        code = code * radix + groups[:, j]
    keys, inverse, counts = np.unique(code, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    keep = counts >= MIN_SHARE * len(settings)
    if not keep.any():
        return low, span, norm.mean(axis=0, keepdims=True)
    sums = np.zeros((len(keys), norm.shape[1]))
    np.add.at(sums, inverse, norm)
    centers = sums[keep] / counts[keep, None]
    order = np.lexsort(centers.T[::-1])  # stable, data-order-independent numbering
    return low, span, centers[order]


def fit_scaler(
    table: RunTable,
    features: tuple[str, ...],
    condition_scaling: bool | str = "auto",
) -> Scaler:
    """Fits min-max ranges per operating condition on `table` (training units only).

    condition_scaling: 'auto' scales per condition when the settings show two or more regimes,
    True always looks for regimes, False scales globally.
    """
    if condition_scaling not in ("auto", True, False):
        raise DataError(
            "config.data.condition_scaling must be 'auto', True or False, "
            f"got {condition_scaling!r}"
        )
    frame = table.frame
    settings = table.settings
    raw_settings = frame[list(settings)].to_numpy(np.float64)
    if condition_scaling is False or not settings:
        low = raw_settings.min(axis=0) if settings else np.zeros(0)
        span = np.ones(len(settings))
        centers = np.zeros((1, len(settings)))
    else:
        low, span, centers = find_conditions(raw_settings)
    scaler = Scaler(
        features=tuple(features),
        settings=tuple(settings),
        setting_low=np.asarray(low, np.float64),
        setting_span=np.asarray(span, np.float64),
        centers=np.asarray(centers, np.float64),
        mins=np.zeros((len(centers), len(features))),
        maxs=np.zeros((len(centers), len(features))),
    )
    cond = scaler.conditions(frame)
    mins = np.full((len(centers), len(features)), np.inf)
    maxs = np.full((len(centers), len(features)), -np.inf)
    for start in range(0, len(frame), TRANSFORM_ROWS):  # no float64 copy of the whole table
        block = frame.iloc[start : start + TRANSFORM_ROWS]
        values = block[list(features)].to_numpy(np.float64)
        part = cond[start : start + TRANSFORM_ROWS]
        for k in np.unique(part):
            rows = values[part == k]
            mins[k] = np.minimum(mins[k], rows.min(axis=0))
            maxs[k] = np.maximum(maxs[k], rows.max(axis=0))
    seen = np.isfinite(mins[:, 0]) if len(features) else np.ones(len(centers), bool)
    mins[~seen], maxs[~seen] = 0.0, 0.0  # a condition with no training rows
    return dataclasses.replace(scaler, mins=mins, maxs=maxs)


def rul_target(table: RunTable, rul_cap: float | None) -> np.ndarray:
    """Piecewise-linear RUL: the true remaining life, capped at `rul_cap` (None or 0: uncapped)."""
    rul = table.frame[RUL].to_numpy(np.float64)
    if rul_cap:
        rul = np.minimum(rul, float(rul_cap))
    return rul.astype(np.float32)


def levelled_columns(scaler: Scaler, cycles: int) -> list[int]:
    """The scaled columns `with_baseline` gives a baseline input: the sensors (settings and the
    age have no unit-specific level), none when `cycles` is 0."""
    if cycles <= 0:
        return []
    skip = {*scaler.settings, TIME}
    return [i for i, name in enumerate(scaler.features) if name not in skip]


def baseline_inputs(scaler: Scaler, cycles: int) -> tuple[str, ...]:
    """Names of the extra inputs `with_baseline` appends, in order."""
    return tuple(scaler.features[i] + BASELINE_SUFFIX for i in levelled_columns(scaler, cycles))


def with_baseline(
    scaled: np.ndarray, row_start: np.ndarray, scaler: Scaler, cycles: int
) -> np.ndarray:
    """`scaled` [rows, F] with each sensor's change since its unit's early-life level appended.

    Why: engines start with different wear and manufacturing offsets (on C-MAPSS FD001 about a
    fifth of the whole degradation trend), which a window of readings cannot tell from wear. The
    level is the mean of the unit's first `cycles` rows, or of all its rows so far while it is
    younger, so each row uses only its own past: a test unit cut early gets the same inputs a
    training unit had at that age. Rows must be grouped by unit (`row_start`: each row's unit's
    first row), and the result does not depend on which other units share the table.
    """
    columns = levelled_columns(scaler, cycles)
    if not columns:
        return scaled
    values = scaled[:, columns].astype(np.float64)
    # Cumulative sums restart at each unit, so a unit's result is the same whatever the chunk.
    running = pd.DataFrame(values).groupby(row_start, sort=False).cumsum().to_numpy()
    rows = np.arange(len(scaled))
    count = np.minimum(rows - row_start + 1, cycles)
    level = running[row_start + count - 1] / count[:, None]
    return np.concatenate([scaled, (values - level).astype(np.float32)], axis=1)
