"""Where a run's data comes from: C-MAPSS, the user's CSV/Parquet tables, or the generator.

`load(config.data)` is the one entry; each source ends in the same validated `RawData`, so
nothing downstream knows which one was used. User tables follow a column mapping in the config
(`config.data.columns`); each entry of `config.data.paths` is one dataset (a glob may expand to
several files of it), and the dataset id travels with every window as a static feature.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from pdm_jax.data import cmapss, synthetic, validate
from pdm_jax.data.table import DATASET, RUL, TIME, UNIT, RawData, RunTable
from pdm_jax.errors import DataError

log = logging.getLogger(__name__)

SOURCES = ("cmapss", "csv", "synthetic")


def _optional(cfg: Any, key: str) -> Any:
    return cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)


def load(data_cfg: Any, data_dir: str | None = None) -> RawData:
    """Loads and validates the configured source; `data_dir` overrides config.data.data_dir."""
    source = data_cfg.source
    if source == "cmapss":
        directory = data_dir or _optional(data_cfg, "data_dir")
        sensors = data_cfg.columns.sensors
        sensors = cmapss.INFORMATIVE_SENSORS if sensors == "auto" else tuple(sensors)
        try:
            cmapss.locate(data_cfg.subset, directory)
        except DataError:
            if directory or not _optional(data_cfg, "download"):
                raise
            from pdm_jax.data import download

            log.info("C-MAPSS %s is not cached; downloading it", data_cfg.subset)
            download.download_cmapss(
                cmapss.cache_dir(), url=data_cfg.download_url, subsets=(data_cfg.subset,)
            )
        return cmapss.load_cmapss(data_cfg.subset, directory, sensors, data_cfg.nan_policy)
    if source == "csv":
        return load_user_data(
            tuple(data_cfg.paths),
            data_cfg.columns,
            data_cfg.nan_policy,
            tuple(_optional(data_cfg, "test_paths") or ()),
        )
    if source == "synthetic":
        return synthetic.generate(**dict(data_cfg.synthetic))
    raise DataError(f"unknown data source {source!r}: expected one of {', '.join(SOURCES)}")


def expand_paths(entries: Sequence[str]) -> list[list[str]]:
    """Each entry (a file or a glob) -> its sorted files; an entry matching nothing is an error."""
    if not entries:
        raise DataError("config.data.paths is empty: give the CSV/Parquet files to train on")
    out = []
    for entry in entries:
        entry = os.path.expanduser(entry)
        files = sorted(glob.glob(entry)) if glob.has_magic(entry) else [entry]
        if not files:
            raise DataError(f"{entry}: no file matches this pattern")
        for f in files:
            validate.require_file(f)
        out.append(files)
    return out


def _columns_cfg(columns: Any) -> dict[str, Any]:
    settings = tuple(columns.settings or ())
    sensors = columns.sensors
    return {
        "unit": columns.unit,
        "time": columns.time,
        "settings": settings,
        "sensors": "auto" if sensors == "auto" else tuple(sensors),
        "failure": _optional(columns, "failure"),
        "rul": _optional(columns, "rul"),
        "ignore": tuple(_optional(columns, "ignore") or ()),
    }


def _resolve_sensors(frame: pd.DataFrame, name: str, cols: dict[str, Any]) -> tuple[str, ...]:
    if cols["sensors"] != "auto":
        return cols["sensors"]
    taken = {cols["unit"], cols["time"], *cols["settings"], cols["failure"], cols["rul"]}
    taken |= set(cols["ignore"])
    sensors = []
    for col in frame.columns:
        col = str(col)
        if col in taken:
            continue
        if not pd.api.types.is_numeric_dtype(frame[col]):
            raise DataError(
                f"{name}: column '{col}' is not numeric, so it cannot be a sensor; list it in "
                "config.data.columns.ignore or set config.data.columns.sensors explicitly"
            )
        sensors.append(col)
    if not sensors:
        raise DataError(f"{name}: no sensor columns found (every column is unit/time/settings)")
    return tuple(sensors)


def _read_files(
    groups: list[list[str]], cols: dict[str, Any], nan_policy: str, need_target: bool
) -> tuple[list[pd.DataFrame], tuple[str, ...]]:
    """Reads and checks every file; returns one frame per dataset and the sensor names."""
    frames = {f: validate.read_user_file(f) for files in groups for f in files}
    for files in groups:  # files of one dataset must agree; datasets may differ (e.g. unit ids)
        validate.check_same_schema([(f, validate.column_kinds(frames[f])) for f in files])
    first_name, first = next(iter(frames.items()))
    sensors = _resolve_sensors(first, first_name, cols)
    target_cols = [c for c in (cols["failure"], cols["rul"]) if c]
    required = [cols["unit"], cols["time"], *cols["settings"], *sensors]
    required += target_cols if need_target else [c for c in target_cols if c in first.columns]
    allowed = None if cols["sensors"] == "auto" else [*required, *target_cols, *cols["ignore"]]
    per_dataset = []
    for files in groups:
        parts = []
        for f in files:
            frame = frames[f]
            validate.check_columns(frame, f, required, allowed)
            numeric = [cols["time"], *cols["settings"], *sensors]
            numeric += [c for c in target_cols if c in frame.columns]
            frame = validate.to_numeric(frame, numeric, f)
            validate.check_units_and_time(frame, f, cols["unit"], cols["time"])
            frame, _ = validate.apply_nan_policy(
                frame, (*cols["settings"], *sensors), nan_policy, f, cols["unit"]
            )
            frame = frame.assign(
                _file=f, _where=[f"{frame.attrs['where']} {i}" for i in frame.index]
            )
            parts.append(frame)
        merged = pd.concat(parts, ignore_index=True)
        dup = merged.duplicated(subset=[cols["unit"], cols["time"]], keep="first").to_numpy()
        if dup.any():
            pos = int(np.flatnonzero(dup)[0])
            row = merged.iloc[pos]
            raise DataError(
                f"{row['_file']}: {row['_where']}: duplicate row for unit "
                f"{validate.unit_name(row[cols['unit']])} at "
                f"{cols['time']}={row[cols['time']]:g} (also in another file of this dataset)"
            )
        per_dataset.append(merged)
    return per_dataset, sensors


def _rul_from_failure(
    frame: pd.DataFrame, codes: np.ndarray, col: str, time: np.ndarray
) -> np.ndarray:
    flag = frame[col].to_numpy(np.float64)
    bad = ~np.isin(flag, (0.0, 1.0))
    if bad.any():
        row = frame.iloc[int(np.flatnonzero(bad)[0])]
        raise DataError(
            f"{row['_file']}: {row['_where']}, column '{col}': failure flag must be 0 or 1"
        )
    n = codes.max() + 1
    fail_time = np.full(n, np.nan)
    hit = np.flatnonzero(flag == 1)
    # First failure per unit (rows are sorted by unit, time).
    first_hit = hit[np.unique(codes[hit], return_index=True)[1]]
    fail_time[codes[first_hit]] = time[first_hit]
    never = np.flatnonzero(np.isnan(fail_time))
    if len(never):
        row = frame.iloc[int(np.flatnonzero(codes == never[0])[0])]
        raise DataError(
            f"{row['_file']}: unit {validate.unit_name(row['_unit_label'])} never fails "
            f"(column '{col}' is 0 on "
            "every row); run-to-failure training needs one failure per unit, or an explicit RUL "
            "column (config.data.columns.rul)"
        )
    after = time > fail_time[codes]
    if after.any():
        row = frame.iloc[int(np.flatnonzero(after)[0])]
        raise DataError(
            f"{row['_file']}: {row['_where']}: unit {validate.unit_name(row['_unit_label'])} "
            "has rows after its "
            f"failure (column '{col}')"
        )
    return fail_time[codes] - time


def _to_table(
    per_dataset: list[pd.DataFrame],
    cols: dict[str, Any],
    sensors: tuple[str, ...],
    name: str,
    target: str,
) -> RunTable:
    labelled = []
    for ds, frame in enumerate(per_dataset):
        frame = frame.assign(**{DATASET: np.int32(ds), "_unit_label": frame[cols["unit"]]})
        labelled.append(frame)
    merged = pd.concat(labelled, ignore_index=True)
    keys = pd.MultiIndex.from_arrays([merged[DATASET], merged["_unit_label"]])
    codes, uniques = pd.factorize(keys, sort=True)
    merged["_code"] = codes
    merged = merged.sort_values(["_code", cols["time"]], kind="stable").reset_index(drop=True)
    codes = merged["_code"].to_numpy(np.int64)
    time = merged[cols["time"]].to_numpy(np.float64)
    if target == "rul":
        rul = merged[cols["rul"]].to_numpy(np.float64)
        bad = ~np.isfinite(rul) | (rul < 0)
        if bad.any():
            row = merged.iloc[int(np.flatnonzero(bad)[0])]
            raise DataError(
                f"{row['_file']}: {row['_where']}, column '{cols['rul']}': RUL must be a finite "
                f"number >= 0, got {row[cols['rul']]!r}"
            )
    elif target == "failure":
        rul = _rul_from_failure(merged, codes, cols["failure"], time)
    elif target == "last":
        last = pd.Series(time).groupby(codes).transform("max").to_numpy()
        rul = last - time
    else:
        rul = np.full(len(merged), np.nan)
    out = pd.DataFrame({UNIT: codes, TIME: time, DATASET: merged[DATASET].to_numpy(np.int32)})
    for col in (*cols["settings"], *sensors):
        out[col] = merged[col].to_numpy(np.float64)
    out[RUL] = rul
    return RunTable(
        frame=out,
        settings=cols["settings"],
        sensors=sensors,
        unit_labels=np.asarray([u[1] for u in uniques], dtype=object),
        unit_dataset=np.asarray([u[0] for u in uniques], dtype=np.int32),
        name=name,
    )


def load_user_data(
    paths: Sequence[str],
    columns: Any,
    nan_policy: str = "error",
    test_paths: Sequence[str] = (),
) -> RawData:
    """User run-to-failure tables -> RawData.

    Training RUL comes from `columns.rul` when given, else from `columns.failure` (time of the
    unit's failure row minus time), else each unit's last row is its failure. `test_paths[i]`
    holds test units of the dataset `paths[i]`; their RUL truth comes from `columns.rul` if the
    files have it, otherwise it is unknown (NaN) and only predictions can be made.
    """
    cols = _columns_cfg(columns)
    groups = expand_paths(paths)
    train_target = "rul" if cols["rul"] else "failure" if cols["failure"] else "last"
    per_dataset, sensors = _read_files(groups, cols, nan_policy, need_target=True)
    train = _to_table(per_dataset, cols, sensors, ", ".join(paths), train_target)
    test = None
    if test_paths:
        if len(test_paths) > len(paths):
            raise DataError(
                f"config.data.test_paths has {len(test_paths)} entries but config.data.paths has "
                f"{len(paths)}; test entry i belongs to dataset i"
            )
        test_groups = expand_paths(test_paths)
        test_cols = {**cols, "sensors": sensors}
        test_frames, _ = _read_files(test_groups, test_cols, nan_policy, need_target=False)
        has_rul = bool(cols["rul"]) and all(cols["rul"] in f.columns for f in test_frames)
        test = _to_table(
            test_frames, test_cols, sensors, ", ".join(test_paths), "rul" if has_rul else "none"
        )
    names = tuple(str(p) for p in paths)
    log.info(
        "user data: %d dataset(s), %d train units, %d rows, sensors %s",
        len(names),
        train.num_units,
        train.num_rows,
        ", ".join(sensors),
    )
    return RawData(train=train, test=test, dataset_names=names)
