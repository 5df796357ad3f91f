"""Checks that turn bad input into one-line `DataError`s naming file, column, row and expectation.

Reading and checking live together so that every message can point at the line a user must fix.
A frame's index holds that position (file line for text, 1-based row for Parquet) and
`frame.attrs["where"]` says which, so messages read "train.csv line 17" or "a.parquet row 3".
Nothing bad is dropped silently: every repair (forward-fill) is counted and returned.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from pdm_jax.errors import DataError, first_line

log = logging.getLogger(__name__)

NAN_POLICIES = ("error", "ffill")
# The models compute in float32: a larger reading would be inf there, and scaling a column that
# spans more than this can overflow even in float64 (1e308 - -1e308).
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _where(frame: pd.DataFrame, pos: int) -> str:
    return f"{frame.attrs.get('where', 'row')} {frame.index[pos]}"


def unit_name(value: object) -> str:
    """How a unit id reads in a message: 7 for 7 or 7.0, 'engine-7' for text."""
    if isinstance(value, bool | np.bool_):
        return str(value)
    if isinstance(value, int | float | np.integer | np.floating):
        number = float(value)
        return str(int(number)) if number.is_integer() else f"{number:g}"
    return repr(str(value))


def display_name(path: str | os.PathLike) -> str:
    return os.fspath(path)


def _open_text(path: str | os.PathLike) -> io.TextIOBase:
    path = os.fspath(path)
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="ascii", errors="replace")
    return open(path, encoding="ascii", errors="replace")


def require_file(path: str | os.PathLike, what: str = "data file") -> None:
    if not os.path.exists(path):
        raise DataError(f"{display_name(path)}: {what} not found")
    if os.path.isdir(path):
        raise DataError(f"{display_name(path)}: expected a {what}, found a directory")
    if os.path.getsize(path) == 0:
        raise DataError(f"{display_name(path)}: empty file (expected {what} rows)")


def read_whitespace_table(path: str | os.PathLike, names: Sequence[str]) -> pd.DataFrame:
    """Reads a header-less, whitespace-separated numeric table (C-MAPSS text files).

    Trailing spaces are fine. A line with the wrong number of fields or a value that is not a
    number raises a DataError naming the line, since the fast reader alone cannot say where.
    """
    require_file(path)
    name = display_name(path)
    try:
        frame = pd.read_csv(path, sep=r"\s+", header=None, dtype=np.float64, engine="c")
    except (ValueError, pd.errors.ParserError):
        frame = None
    if frame is not None and frame.shape[1] == len(names) and len(frame) > 0:
        if frame.isna().to_numpy().any():
            # A short line also reads as NaN: tell it apart from a real 'nan' value.
            scan_whitespace_lines(path, names)
        frame.columns = list(names)
        frame.index = np.arange(1, len(frame) + 1)
        frame.attrs["where"] = "line"
        return frame
    scan_whitespace_lines(path, names)
    raise DataError(
        f"{name}: could not parse as {len(names)} whitespace-separated numbers per line"
    )


def scan_whitespace_lines(path: str | os.PathLike, names: Sequence[str]) -> None:
    """The slow path: finds the first offending line, to say exactly what is wrong."""
    name = display_name(path)
    rows = 0
    with _open_text(path) as handle:
        for lineno, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                raise DataError(f"{name}: line {lineno} is blank (expected {len(names)} values)")
            rows += 1
            if len(fields) != len(names):
                raise DataError(
                    f"{name}: line {lineno} has {len(fields)} values, expected {len(names)} "
                    f"({names[0]} … {names[-1]})"
                )
            for col, field in zip(names, fields, strict=True):
                try:
                    float(field)
                except ValueError:
                    raise DataError(
                        f"{name}: line {lineno}, column '{col}': {field!r} is not a number"
                    ) from None
    if rows == 0:
        raise DataError(f"{name}: empty file (no data rows)")


def read_user_file(path: str | os.PathLike) -> pd.DataFrame:
    """Reads one user CSV or Parquet long table; the index becomes the line/row for messages."""
    require_file(path)
    name = display_name(path)
    lower = name.lower()
    try:
        if lower.endswith((".parquet", ".pq")):
            frame = pd.read_parquet(path)
            frame.index = np.arange(1, len(frame) + 1)
            frame.attrs["where"] = "row"
        elif lower.endswith((".csv", ".csv.gz", ".txt")):
            frame = pd.read_csv(path)
            frame.index = np.arange(2, len(frame) + 2)  # line 1 is the header
            frame.attrs["where"] = "line"
        else:
            raise DataError(f"{name}: unsupported file type (expected .csv or .parquet)")
    except DataError:
        raise
    except pd.errors.EmptyDataError:
        raise DataError(f"{name}: empty file (expected a header and data rows)") from None
    except Exception as exc:  # pandas/pyarrow raise many types; the user needs one line
        raise DataError(f"{name}: cannot read: {first_line(exc)}") from None
    if len(frame) == 0:
        raise DataError(f"{name}: no data rows (only a header)")
    return frame


def check_columns(
    frame: pd.DataFrame,
    name: str,
    required: Sequence[str],
    allowed: Sequence[str] | None,
) -> None:
    """Missing required columns are an error; so are undeclared ones when `allowed` is given."""
    present = [str(c) for c in frame.columns]
    missing = [c for c in required if c not in present]
    if missing:
        raise DataError(
            f"{name}: missing column(s) {', '.join(repr(c) for c in missing)} "
            f"(file has: {', '.join(present)})"
        )
    if allowed is not None:
        extra = [c for c in present if c not in set(allowed)]
        if extra:
            raise DataError(
                f"{name}: unexpected column(s) {', '.join(repr(c) for c in extra)}; list them in "
                "config.data.columns.sensors or config.data.columns.ignore"
            )


def to_numeric(frame: pd.DataFrame, columns: Sequence[str], name: str) -> pd.DataFrame:
    """Casts columns to float64; the first non-numeric cell, or one beyond float32's range, is
    reported by column and line (non-finite cells are the NaN policy's)."""
    out = frame.copy()
    for col in columns:
        values = _as_float64(frame, col, name)
        big = np.isfinite(values) & (np.abs(values) > FLOAT32_MAX)
        if big.any():
            pos = int(np.flatnonzero(big)[0])
            raise DataError(
                f"{name}: {_where(frame, pos)}, column '{col}': {values[pos]:g} is beyond "
                f"float32's range (+-{FLOAT32_MAX:.3g}), which the models compute in"
            )
        out[col] = values
    return out


def _as_float64(frame: pd.DataFrame, col: str, name: str) -> np.ndarray:
    series = frame[col]
    if pd.api.types.is_bool_dtype(series) or pd.api.types.is_numeric_dtype(series):
        return series.astype(np.float64).to_numpy()
    coerced = pd.to_numeric(series, errors="coerce")
    bad = coerced.isna().to_numpy() & series.notna().to_numpy()
    # Strings such as "nan"/"inf" coerce fine; only real non-numbers land here.
    if bad.any():
        pos = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{name}: {_where(frame, pos)}, column '{col}': {series.iloc[pos]!r} is not a number"
        )
    return coerced.astype(np.float64).to_numpy()


def apply_nan_policy(
    frame: pd.DataFrame, columns: Sequence[str], policy: str, name: str, unit_col: str
) -> tuple[pd.DataFrame, int]:
    """NaN/inf in sensor or setting columns: an error, or forward-filled within each unit.

    Returns the frame and how many cells were filled, so the caller can log the count. A gap at
    the start of a unit has nothing before it to fill from and stays an error under both policies.
    """
    if policy not in NAN_POLICIES:
        raise DataError(f"nan_policy {policy!r} is not one of {NAN_POLICIES}")
    values = frame[list(columns)].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if not bad.any():
        return frame, 0
    rows, cols = np.nonzero(bad)
    first_row, first_col = int(rows[0]), columns[int(cols[0])]
    cell = values[first_row, int(cols[0])]
    if policy == "error":
        raise DataError(
            f"{name}: {_where(frame, first_row)}, column '{first_col}': {cell} is not a finite "
            f"number ({int(bad.sum())} such cells; set config.data.nan_policy='ffill' to "
            "forward-fill within each unit)"
        )
    out = frame.copy()
    cleaned = out[list(columns)].where(np.isfinite(values))
    filled = cleaned.groupby(out[unit_col].to_numpy(), sort=False).ffill()
    still = filled.isna().to_numpy()
    if still.any():
        r, c = np.nonzero(still)
        raise DataError(
            f"{name}: {_where(frame, int(r[0]))}, column '{columns[int(c[0])]}': not a finite "
            f"number at the start of unit {unit_name(out[unit_col].iloc[int(r[0])])}, nothing to "
            "forward-fill from"
        )
    out[list(columns)] = filled.to_numpy()
    count = int(bad.sum())
    log.warning("%s: forward-filled %d non-finite cell(s) within units", name, count)
    return out, count


# infer_dtype's answers for an object column whose every cell is a plain number or text.
SCALAR_KINDS = frozenset({"string", "integer", "floating", "mixed-integer-float", "boolean"})


def check_unit_ids(frame: pd.DataFrame, name: str, unit_col: str) -> None:
    """Unit ids are numbers or text: a list or record (a nested Parquet column) names no unit,
    and cannot be compared, grouped or written back."""
    units = frame[unit_col]
    # pandas' C-level type inference answers for the usual all-text or all-number column at a
    # twentieth of the cost of the cell-by-cell test; streamed inputs run this check twice.
    if units.dtype != object or pd.api.types.infer_dtype(units, skipna=False) in SCALAR_KINDS:
        return
    scalar = np.fromiter(map(pd.api.types.is_scalar, units), bool, len(units))
    if not scalar.all():
        pos = int(np.flatnonzero(~scalar)[0])
        raise DataError(
            f"{name}: {_where(frame, pos)}, column '{unit_col}': unit ids must be numbers or "
            f"text, found a {type(units.iloc[pos]).__name__} value"
        )


def check_units_and_time(frame: pd.DataFrame, name: str, unit_col: str, time_col: str) -> None:
    """Each (unit, time) once; time strictly increasing down the file within each unit."""
    check_unit_ids(frame, name, unit_col)
    units = frame[unit_col]
    times = frame[time_col].to_numpy(dtype=np.float64)
    if not np.isfinite(times).all():
        pos = int(np.flatnonzero(~np.isfinite(times))[0])
        raise DataError(f"{name}: {_where(frame, pos)}, column '{time_col}': time is not finite")
    if units.isna().any():
        pos = int(np.flatnonzero(units.isna().to_numpy())[0])
        raise DataError(f"{name}: {_where(frame, pos)}, column '{unit_col}': unit id is missing")
    dup = frame.duplicated(subset=[unit_col, time_col], keep="first").to_numpy()
    if dup.any():
        pos = int(np.flatnonzero(dup)[0])
        raise DataError(
            f"{name}: {_where(frame, pos)}: duplicate row for unit {unit_name(units.iloc[pos])} at "
            f"{time_col}={times[pos]:g}"
        )
    codes = pd.factorize(units, sort=False)[0]
    same_unit = codes[1:] == codes[:-1]
    back = same_unit & (times[1:] <= times[:-1])
    if back.any():
        pos = int(np.flatnonzero(back)[0]) + 1
        raise DataError(
            f"{name}: {_where(frame, pos)}: time {times[pos]:g} of unit "
            f"{unit_name(units.iloc[pos])} does "
            f"not increase (previous row has {times[pos - 1]:g}); rows of a unit must be in "
            "increasing time order"
        )
    # A unit must be one contiguous block; interleaved units are fine in principle, but a unit
    # that reappears after others usually means two files or ids were mixed up.
    starts = np.flatnonzero(np.concatenate([[True], ~same_unit]))
    seen_codes = codes[starts]
    if len(np.unique(seen_codes)) != len(seen_codes):
        _, first_idx, counts = np.unique(seen_codes, return_index=True, return_counts=True)
        repeated = seen_codes[np.sort(first_idx[counts > 1])[0]]
        second = starts[np.flatnonzero(seen_codes == repeated)[1]]
        raise DataError(
            f"{name}: {_where(frame, int(second))}: rows of unit "
            f"{unit_name(units.iloc[int(second)])} "
            "are not contiguous (the unit appears again after other units)"
        )


def check_rul_truth(rul: np.ndarray, n_units: int, name: str, what: str = "test units") -> None:
    """One non-negative RUL per test unit, in unit order."""
    if len(rul) != n_units:
        raise DataError(f"{name}: {len(rul)} RUL values, expected one per {what} ({n_units})")
    rul = np.asarray(rul, dtype=np.float64)
    if not np.isfinite(rul).all():
        pos = int(np.flatnonzero(~np.isfinite(rul))[0])
        raise DataError(f"{name}: line {pos + 1}: RUL is not a finite number")
    if (rul < 0).any():
        pos = int(np.flatnonzero(rul < 0)[0])
        raise DataError(f"{name}: line {pos + 1}: negative RUL {rul[pos]:g}")


def check_same_schema(schemas: Sequence[tuple[str, dict[str, str]]]) -> None:
    """Files combined into one dataset must agree on columns and their kinds (number vs text)."""
    if not schemas:
        return
    first_name, first = schemas[0]
    for name, schema in schemas[1:]:
        if list(schema) != list(first):
            only_a = [c for c in first if c not in schema]
            only_b = [c for c in schema if c not in first]
            detail = []
            if only_a:
                detail.append(f"missing {', '.join(repr(c) for c in only_a)}")
            if only_b:
                detail.append(f"extra {', '.join(repr(c) for c in only_b)}")
            if not detail:
                detail.append("same columns in a different order")
            raise DataError(f"{name}: schema differs from {first_name}: {'; '.join(detail)}")
        for col, kind in schema.items():
            if kind != first[col]:
                raise DataError(
                    f"{name}: column '{col}' is {kind}, but {first[col]} in {first_name}"
                )


def column_kinds(frame: pd.DataFrame) -> dict[str, str]:
    return {
        str(c): ("numeric" if pd.api.types.is_numeric_dtype(frame[c]) else "text")
        for c in frame.columns
    }
