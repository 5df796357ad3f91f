"""Chunked reading (pdm_jax.data.chunked): whole units per chunk, line numbers kept, errors found
deep in a file still name their line, and a unit split across chunks by other units is refused."""

import numpy as np
import pandas as pd
import pytest

from pdm_jax.data import chunked, cmapss
from pdm_jax.errors import DataError


@pytest.fixture(scope="module")
def history(cmapss_dir):
    return cmapss.read_history(cmapss_dir / "test_FD001.txt")


def _check_whole_units(chunks, whole, unit_col):
    """Every unit in exactly one chunk; together the chunks are the file, in order."""
    seen = [set(pd.unique(c[unit_col])) for c in chunks]
    assert sum(len(s) for s in seen) == len(set().union(*seen))
    joined = pd.concat(chunks)
    np.testing.assert_array_equal(joined.index, whole.index)
    np.testing.assert_array_equal(joined.to_numpy(np.float64), whole.to_numpy(np.float64))


@pytest.mark.parametrize("kind", ["text", "csv", "parquet"])
def test_chunks_hold_whole_units_and_keep_line_numbers(history, cmapss_dir, tmp_path, kind):
    if kind == "text":
        path = cmapss_dir / "test_FD001.txt"
        whole = history
    elif kind == "csv":
        path = tmp_path / "t.csv.gz"
        history.to_csv(path, index=False)
        whole = history.set_axis(history.index + 1)  # line 1 is the header
    else:
        path = tmp_path / "t.parquet"
        history.to_parquet(path, index=False)
        whole = history
    assert chunked.kind_of(path) == kind
    assert chunked.row_count(path, kind) == len(history) == 13_096
    chunks = list(chunked.unit_chunks(path, kind, "unit", 1000, cmapss.COLUMNS))
    assert 10 <= len(chunks) <= 14  # ~13 cuts, a few merged where a unit straddles
    assert all(len(c) <= 1000 + 400 for c in chunks)  # a chunk plus at most one unit's rows
    _check_whole_units(chunks, whole, "unit")
    where = {"text": "line", "csv": "line", "parquet": "row"}[kind]
    assert all(c.attrs["where"] == where for c in chunks)
    one = list(chunked.unit_chunks(path, kind, "unit", 10**6, cmapss.COLUMNS))
    assert len(one) == 1 and len(one[0]) == len(history)


def test_a_unit_longer_than_a_chunk_stays_whole(history, tmp_path):
    path = tmp_path / "t.csv"
    history[history["unit"] <= 10].to_csv(path, index=False)
    chunks = list(chunked.unit_chunks(path, "csv", "unit", 7))
    assert len(chunks) == 10  # every unit is longer than 7 rows: one chunk each
    assert [int(c["unit"].iloc[0]) for c in chunks] == list(range(1, 11))


def test_unit_reappearing_after_others_in_a_later_chunk_is_refused(history, tmp_path):
    first = history[history["unit"] == 1]
    path = tmp_path / "t.csv"
    pd.concat([history, first.head(3)]).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"t\.csv: line 13098: rows of unit 1 are not contiguous"):
        list(chunked.unit_chunks(path, "csv", "unit", 500))


def test_bad_text_line_deep_in_the_file_is_named(history, tmp_path):
    path = tmp_path / "test_FD009.txt"
    text = history.to_csv(sep=" ", header=False, index=False).splitlines()
    text[12_000] = text[12_000].rsplit(" ", 1)[0]  # one value short
    path.write_text("\n".join(text) + "\n")
    chunks = chunked.unit_chunks(path, "text", "unit", 1000, cmapss.COLUMNS)
    with pytest.raises(DataError, match=r"line 12001 has 25 values, expected 26"):
        list(chunks)


def test_unreadable_and_empty_inputs(tmp_path):
    empty = tmp_path / "e.csv"
    empty.write_text("unit,cycle\n")
    with pytest.raises(DataError, match=r"e\.csv: no data rows"):
        list(chunked.unit_chunks(empty, "csv", "unit", 10))
    with pytest.raises(DataError, match="unsupported file type"):
        chunked.kind_of(tmp_path / "x.xlsx")
    broken = tmp_path / "b.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"b\.parquet: cannot read"):
        chunked.header(broken, "parquet")
