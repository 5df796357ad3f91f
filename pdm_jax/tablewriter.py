"""A CSV or Parquet output written a frame at a time, visible only once complete.

Batch inference streams its predictions out as it goes, so memory stays flat on inputs of any
size; a run that fails half way must still leave no partial file where a downstream job would pick
it up. Frames go to a hidden temp file beside the target, which `commit` renames into place (an
atomic `os.replace` on one filesystem); leaving the context without committing removes it.
"""

from __future__ import annotations

import gzip
import os
from typing import IO, Any

import pandas as pd

from pdm_jax.errors import ConfigError, DataError

SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq")


def table_format(path: str | os.PathLike, flag: str = "--output") -> str:
    """'csv' or 'parquet' by extension; anything else is a `ConfigError` naming `flag`."""
    lower = os.fspath(path).lower()
    if lower.endswith((".parquet", ".pq")):
        return "parquet"
    if lower.endswith((".csv", ".csv.gz")):
        return "csv"
    raise ConfigError(
        f"{flag}: {os.fspath(path)}: unsupported extension (expected one of {', '.join(SUFFIXES)})"
    )


class AtomicTableWriter:
    """`with AtomicTableWriter(path) as out: out.write(frame); ...; out.commit()`."""

    def __init__(self, path: str | os.PathLike, flag: str = "--output"):
        self.path = os.fspath(path)
        self.kind = table_format(self.path, flag)
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise ConfigError(f"{flag}: {self.path}: directory {directory} does not exist")
        self.tmp = os.path.join(directory, f".{os.path.basename(self.path)}.{os.getpid()}.tmp")
        self.rows = 0
        self._handle: IO[str] | None = None
        self._parquet: Any = None  # pyarrow.parquet.ParquetWriter once the first frame is in
        self._done = False

    def __enter__(self) -> AtomicTableWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(self, frame: pd.DataFrame) -> None:
        if self._done:
            raise RuntimeError(f"{self.path}: already committed")
        if self.kind == "parquet":
            self._write_parquet(frame)
        else:
            if self._handle is None:
                # Held open across writes and closed by commit/close: not a `with` block.
                if self.path.lower().endswith(".gz"):
                    self._handle = gzip.open(self.tmp, "wt", newline="")  # noqa: SIM115
                else:
                    self._handle = open(self.tmp, "w", newline="")  # noqa: SIM115
                frame.to_csv(self._handle, index=False)
            else:
                frame.to_csv(self._handle, index=False, header=False)
        self.rows += len(frame)

    def _write_parquet(self, frame: pd.DataFrame) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(frame, preserve_index=False)
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self.tmp, table.schema)
        elif not table.schema.equals(self._parquet.schema, check_metadata=False):
            try:
                table = table.cast(self._parquet.schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
                raise DataError(
                    f"{self.path}: later rows do not fit the Parquet columns the first rows set "
                    f"({self._parquet.schema.to_string(show_schema_metadata=False)!r} vs "
                    f"{table.schema.to_string(show_schema_metadata=False)!r}), e.g. unit ids that "
                    "are numbers in one input and text in another; write CSV instead"
                ) from None
        self._parquet.write_table(table)

    def commit(self) -> None:
        """Closes the temp file and moves it to `path`."""
        if self._handle is None and self._parquet is None:
            raise RuntimeError(f"{self.path}: nothing was written")
        self._close_files()
        os.replace(self.tmp, self.path)
        self._done = True

    def _close_files(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._parquet is not None:
            self._parquet.close()
            self._parquet = None

    def close(self) -> None:
        """Without a commit: the temp file goes, the target is untouched."""
        self._close_files()
        if not self._done and os.path.exists(self.tmp):
            os.remove(self.tmp)


def write_table(frame: pd.DataFrame, path: str | os.PathLike, flag: str = "--output") -> None:
    """The whole frame at once, with the same no-partial-file guarantee."""
    with AtomicTableWriter(path, flag) as out:
        out.write(frame)
        out.commit()
