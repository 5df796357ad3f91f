"""Reading a long table a bounded number of rows at a time, handed out as whole units.

Batch inference must not need the whole input in memory: a fleet's history can be far larger than
the model. Readers here yield frames of at most about `chunk_rows` rows (plus the rows of one unit
that straddles the boundary, which is held back and joined to the next chunk), with the index and
`attrs["where"]` that `validate` uses, so an error deep in a file still names its line or row.
Units must be contiguous, as `validate.check_units_and_time` already demands of a whole file; a
unit that reappears in a later chunk is the same error, caught across chunks.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd

from pdm_jax.data import validate
from pdm_jax.errors import DataError, first_line

KINDS = ("text", "csv", "parquet")
DEFAULT_CHUNK_ROWS = 500_000


def kind_of(path: str | os.PathLike) -> str:
    """'text' (C-MAPSS whitespace text), 'csv' or 'parquet', by extension and first line."""
    path = os.fspath(path)
    lower = path.lower()
    if lower.endswith((".parquet", ".pq")):
        return "parquet"
    if lower.endswith((".txt", ".txt.gz")):
        opener = gzip.open if lower.endswith(".gz") else open
        with opener(path, "rt", encoding="ascii", errors="replace") as handle:
            first = handle.readline()
        return "csv" if "," in first else "text"
    if lower.endswith((".csv", ".csv.gz")):
        return "csv"
    raise DataError(
        f"{validate.display_name(path)}: unsupported file type (expected C-MAPSS .txt, .csv or "
        ".parquet)"
    )


def header(path: str | os.PathLike, kind: str, text_names: Sequence[str] = ()) -> list[str]:
    """The column names, read without the data: enough to check a file before any work."""
    name = validate.display_name(path)
    if kind == "text":
        return list(text_names)
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            return [str(c) for c in pq.ParquetFile(path).schema_arrow.names]
        return [str(c) for c in pd.read_csv(path, nrows=0).columns]
    except pd.errors.EmptyDataError:
        raise DataError(f"{name}: empty file (expected a header and data rows)") from None
    except Exception as exc:  # pandas/pyarrow raise many types; the user needs one line
        raise DataError(f"{name}: cannot read: {first_line(exc)}") from None


def row_count(path: str | os.PathLike, kind: str) -> int | None:
    """Data rows, where cheap to know without parsing (Parquet metadata; lines of text)."""
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            return int(pq.ParquetFile(path).metadata.num_rows)
        opener = gzip.open if os.fspath(path).lower().endswith(".gz") else open
        lines, last = 0, b"\n"
        with opener(path, "rb") as handle:
            while block := handle.read(1 << 22):
                lines += block.count(b"\n")
                last = block[-1:]
        lines += last != b"\n"  # a last line without its newline
        return lines - (kind == "csv")
    except Exception:  # only the progress total depends on it
        return None


def _raw_chunks(
    path: str | os.PathLike, kind: str, chunk_rows: int, text_names: Sequence[str]
) -> Iterator[pd.DataFrame]:
    """Frames of `chunk_rows` rows in file order, indexed by line (text, CSV) or row (Parquet)."""
    name = validate.display_name(path)
    validate.require_file(path, "input file")
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            offset = 0
            for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows):
                frame = batch.to_pandas()
                frame.index = np.arange(offset + 1, offset + len(frame) + 1)
                frame.attrs["where"] = "row"
                offset += len(frame)
                yield frame
            return
        if kind == "text":
            reader = pd.read_csv(
                path, sep=r"\s+", header=None, dtype=np.float64, engine="c", chunksize=chunk_rows
            )
            line_offset = 1
        else:
            reader = pd.read_csv(path, chunksize=chunk_rows)
            line_offset = 2  # line 1 is the header
        with reader:
            for frame in reader:
                if kind == "text":
                    if frame.shape[1] != len(text_names) or frame.isna().to_numpy().any():
                        validate.scan_whitespace_lines(path, text_names)
                    frame.columns = list(text_names)
                frame.index = frame.index + line_offset
                frame.attrs["where"] = "line"
                yield frame
    except DataError:
        raise
    except pd.errors.EmptyDataError:
        raise DataError(f"{name}: empty file (expected a header and data rows)") from None
    except (ValueError, pd.errors.ParserError) as exc:
        if kind == "text":
            validate.scan_whitespace_lines(path, text_names)
        raise DataError(f"{name}: cannot read: {first_line(exc)}") from None
    except Exception as exc:  # pandas/pyarrow raise many types; the user needs one line
        raise DataError(f"{name}: cannot read: {first_line(exc)}") from None


def unit_chunks(
    path: str | os.PathLike,
    kind: str,
    unit_col: str,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    text_names: Sequence[str] = (),
) -> Iterator[pd.DataFrame]:
    """Frames holding whole units: each chunk's last unit is held back until the next chunk
    shows where it ends. A unit seen in an earlier frame and again later is a `DataError`."""
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise DataError(f"chunk_rows must be an integer >= 1, got {chunk_rows!r}")
    name = validate.display_name(path)
    finished: set = set()

    def checked(frame: pd.DataFrame) -> pd.DataFrame:
        if finished:
            units = frame[unit_col]
            again = units.isin(finished).to_numpy()
            if again.any():
                pos = int(np.flatnonzero(again)[0])
                raise DataError(
                    f"{name}: {frame.attrs['where']} {frame.index[pos]}: rows of unit "
                    f"{validate.unit_name(units.iloc[pos])} are not contiguous (the unit appears "
                    "again after other units)"
                )
        finished.update(pd.unique(frame[unit_col]))
        return frame

    # One chunk of look-ahead: a chunk is cut only once the next shows that data follows it, so a
    # file that fits in one chunk comes back whole.
    pending: pd.DataFrame | None = None
    for raw in _raw_chunks(path, kind, chunk_rows, text_names):
        if not len(raw):
            continue
        if unit_col not in raw.columns:
            yield raw  # the caller's column check names what is missing
            return
        validate.check_unit_ids(raw, name, unit_col)  # before ids are compared across chunks
        if pending is not None:
            units = pending[unit_col]
            tail = (units == units.iloc[-1]).to_numpy()
            cut = 0 if tail.all() else len(pending) - int(np.argmin(tail[::-1]))
            where = raw.attrs["where"]
            raw = pd.concat([pending.iloc[cut:], raw])
            raw.attrs["where"] = where
            if cut:
                yield checked(pending.iloc[:cut])
        pending = raw
    if pending is None:
        raise DataError(f"{name}: no data rows")
    yield checked(pending)
