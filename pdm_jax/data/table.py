"""The validated long table every data source produces, so features and windows see one shape.

One row per (unit, time step), units contiguous and time strictly increasing within a unit.
Sources differ only in how they get here; everything downstream reads `RunTable` alone.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

UNIT = "unit"
TIME = "time"
DATASET = "dataset"
RUL = "rul"
BASELINE_SUFFIX = "-baseline"  # a sensor's change since its unit's early life (features)


@dataclasses.dataclass(frozen=True)
class RunTable:
    """Run histories of many units.

    `frame` has the columns UNIT (int codes 0..n_units-1, contiguous blocks), TIME, DATASET,
    the settings, the sensors and RUL (float; NaN where the truth is unknown). `unit_labels[k]`
    is the user's id of unit code k and `unit_dataset[k]` its dataset id, so outputs can name
    units the way the user does.
    """

    frame: pd.DataFrame
    settings: tuple[str, ...]
    sensors: tuple[str, ...]
    unit_labels: np.ndarray
    unit_dataset: np.ndarray
    name: str

    @property
    def num_units(self) -> int:
        return len(self.unit_labels)

    @property
    def num_rows(self) -> int:
        return len(self.frame)

    def unit_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Row offsets [start, stop) of each unit's contiguous block."""
        codes = self.frame[UNIT].to_numpy()
        stops = np.flatnonzero(np.diff(codes)) + 1
        starts = np.concatenate([[0], stops]).astype(np.int64)
        ends = np.concatenate([stops, [len(codes)]]).astype(np.int64)
        return starts, ends

    def select_units(self, codes: np.ndarray, name: str | None = None) -> RunTable:
        """A table holding only the given unit codes, renumbered 0..k-1 in the given order."""
        codes = np.asarray(codes, dtype=np.int64)
        remap = np.full(self.num_units, -1, dtype=np.int64)
        remap[codes] = np.arange(len(codes))
        new_codes = remap[self.frame[UNIT].to_numpy()]
        rows = np.flatnonzero(new_codes >= 0)
        new_codes = new_codes[rows]
        # Most selections (the train/validation split) keep the units in order: then the rows
        # are already sorted, and skipping the sort saves two copies of the table at its peak.
        if len(rows) > 1 and (np.diff(new_codes) < 0).any():
            rows = rows[np.argsort(new_codes, kind="stable")]  # blocks stay in time order
            new_codes = remap[self.frame[UNIT].to_numpy()[rows]]
        frame = self.frame.take(rows)  # a new frame (copy-on-write pandas: no copy warning)
        frame[UNIT] = new_codes
        frame = frame.reset_index(drop=True)
        return RunTable(
            frame=frame,
            settings=self.settings,
            sensors=self.sensors,
            unit_labels=self.unit_labels[codes],
            unit_dataset=self.unit_dataset[codes],
            name=name or self.name,
        )


@dataclasses.dataclass(frozen=True)
class RawData:
    """What a source yields: training histories, optional test histories with RUL truth."""

    train: RunTable
    test: RunTable | None
    dataset_names: tuple[str, ...]
