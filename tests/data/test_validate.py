"""Every bad input -> a DataError whose one-line message names file, column/row and expectation."""

import numpy as np
import pandas as pd
import pytest

from pdm_jax.data import cmapss, sources
from pdm_jax.errors import DataError
from tests.conftest import load_config

GOOD_LINE = "1 1 -0.0007 -0.0004 100.0 " + " ".join(["1.0"] * 21) + "  \n"


def _cmapss_dir(tmp_path, train=None, test=None, rul=None):
    """A C-MAPSS-shaped directory from small hand-written files."""

    def history(units=(1, 2), rows=3):
        return "".join(
            f"{u} {t} 0.0 0.0 100.0 " + " ".join(f"{u + t * 0.1:.2f}" for _ in range(21)) + "  \n"
            for u in units
            for t in range(1, rows + 1)
        )

    (tmp_path / "train_FD002.txt").write_text(history() if train is None else train)
    (tmp_path / "test_FD002.txt").write_text(history() if test is None else test)
    (tmp_path / "RUL_FD002.txt").write_text("10 \n20 \n" if rul is None else rul)
    return tmp_path


def _load(directory, **kw):
    return cmapss.load_cmapss("FD002", directory, **kw)


def _columns(**overrides):
    cols = load_config().data.columns
    cols.settings = ("op",)
    cols.sensors = ("a", "b")
    for key, value in overrides.items():
        cols[key] = value
    return cols


def _frame(units=(1, 2), rows=4):
    recs = [
        {"unit": u, "time": t, "op": 1.0, "a": u * 10 + t, "b": float(t) / 2}
        for u in units
        for t in range(1, rows + 1)
    ]
    return pd.DataFrame(recs)


def _csv(tmp_path, frame, name="train.csv"):
    path = tmp_path / name
    if name.endswith(".parquet"):
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    return str(path)


def _one_line(err):
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# --- C-MAPSS text files -------------------------------------------------------------------


def test_good_small_cmapss_dir_loads(tmp_path):
    data = _load(_cmapss_dir(tmp_path))
    assert data.train.num_units == 2 and data.test.num_units == 2


def test_missing_file(tmp_path):
    directory = _cmapss_dir(tmp_path)
    (directory / "RUL_FD002.txt").unlink()
    with pytest.raises(DataError, match=r"RUL_FD002\.txt"):
        _load(directory)


def test_empty_file(tmp_path):
    with pytest.raises(DataError, match=r"train_FD002.txt: empty file") as err:
        _load(_cmapss_dir(tmp_path, train=""))
    _one_line(err)


def test_wrong_column_count_names_the_line(tmp_path):
    bad = GOOD_LINE + "1 2 0.0 0.0 100.0 " + " ".join(["1.0"] * 20) + "\n"
    with pytest.raises(DataError, match=r"train_FD002.txt: line 2 has 25 values, expected 26"):
        _load(_cmapss_dir(tmp_path, train=bad))
    extra = GOOD_LINE + "1 2 0.0 0.0 100.0 " + " ".join(["1.0"] * 22) + "\n"
    with pytest.raises(DataError, match=r"line 2 has 27 values, expected 26"):
        _load(_cmapss_dir(tmp_path, train=extra))


def test_non_numeric_value_names_line_and_column(tmp_path):
    bad = GOOD_LINE + "1 2 0.0 0.0 100.0 1.0 1.0 oops " + " ".join(["1.0"] * 18) + "\n"
    with pytest.raises(DataError, match=r"line 2, column 's_3': 'oops' is not a number") as err:
        _load(_cmapss_dir(tmp_path, train=bad))
    _one_line(err)


def test_nan_sensor_error_and_ffill(tmp_path):
    lines = [GOOD_LINE, "1 2 0.0 0.0 100.0 1.0 nan " + " ".join(["1.0"] * 19) + "\n"]
    directory = _cmapss_dir(tmp_path, train="".join(lines))
    with pytest.raises(DataError, match=r"line 2, column 's_2': nan is not a finite number.*ffill"):
        _load(directory)
    data = _load(directory, nan_policy="ffill")
    assert data.train.frame["s_2"].tolist() == [1.0, 1.0]


def test_inf_is_treated_like_nan(tmp_path):
    lines = [GOOD_LINE, "1 2 0.0 0.0 100.0 1.0 1.0 inf " + " ".join(["1.0"] * 18) + "\n"]
    with pytest.raises(DataError, match=r"line 2, column 's_3': inf is not a finite"):
        _load(_cmapss_dir(tmp_path, train="".join(lines)))


def test_duplicate_unit_time(tmp_path):
    with pytest.raises(DataError, match=r"line 2: duplicate row for unit 1 at cycle=1"):
        _load(_cmapss_dir(tmp_path, train=GOOD_LINE + GOOD_LINE))


def test_non_increasing_time(tmp_path):
    second = GOOD_LINE.replace("1 1 ", "1 3 ", 1)
    third = GOOD_LINE.replace("1 1 ", "1 2 ", 1)
    with pytest.raises(DataError, match=r"line 3: time 2 of unit 1 does not increase"):
        _load(_cmapss_dir(tmp_path, train=GOOD_LINE + second + third))


def test_unit_without_rows(tmp_path):
    unit3 = GOOD_LINE.replace("1 1 ", "3 1 ", 1)
    with pytest.raises(DataError, match=r"unit 2 has no rows"):
        _load(_cmapss_dir(tmp_path, train=GOOD_LINE + unit3))


def test_rul_count_mismatch(tmp_path):
    with pytest.raises(
        DataError, match=r"RUL_FD002.txt: 3 RUL values, expected one per test units \(2\)"
    ):
        _load(_cmapss_dir(tmp_path, rul="1\n2\n3\n"))


def test_negative_rul(tmp_path):
    with pytest.raises(DataError, match=r"RUL_FD002.txt: line 2: negative RUL -5"):
        _load(_cmapss_dir(tmp_path, rul="1\n-5\n"))


# --- user CSV / Parquet --------------------------------------------------------------------


def test_csv_happy_path_and_rul_from_last_row(tmp_path):
    data = sources.load_user_data([_csv(tmp_path, _frame())], _columns())
    assert data.train.num_units == 2 and data.train.num_rows == 8
    assert data.train.frame.groupby("unit")["rul"].max().tolist() == [3.0, 3.0]


def test_csv_missing_file_and_glob(tmp_path):
    with pytest.raises(DataError, match=r"nope.csv: data file not found"):
        sources.load_user_data([str(tmp_path / "nope.csv")], _columns())
    with pytest.raises(DataError, match=r"\*.parquet: no file matches this pattern"):
        sources.load_user_data([str(tmp_path / "*.parquet")], _columns())


def test_csv_empty_and_header_only(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match=r"empty.csv: empty file"):
        sources.load_user_data([str(tmp_path / "empty.csv")], _columns())
    (tmp_path / "head.csv").write_text("unit,time,op,a,b\n")
    with pytest.raises(DataError, match=r"head.csv: no data rows"):
        sources.load_user_data([str(tmp_path / "head.csv")], _columns())


def test_csv_missing_and_extra_columns(tmp_path):
    path = _csv(tmp_path, _frame().drop(columns=["b"]))
    with pytest.raises(DataError, match=r"train.csv: missing column\(s\) 'b'"):
        sources.load_user_data([path], _columns())
    path = _csv(tmp_path, _frame().assign(note=1.0), "extra.csv")
    with pytest.raises(DataError, match=r"extra.csv: unexpected column\(s\) 'note'.*ignore"):
        sources.load_user_data([path], _columns())
    data = sources.load_user_data([path], _columns(ignore=("note",)))
    assert data.train.sensors == ("a", "b")


def test_csv_non_numeric_names_line(tmp_path):
    frame = _frame().astype({"a": object})
    frame.loc[2, "a"] = "broken"
    with pytest.raises(DataError, match=r"train.csv: line 4, column 'a': 'broken' is not a number"):
        sources.load_user_data([_csv(tmp_path, frame)], _columns())


def test_csv_auto_sensors_refuse_text_columns(tmp_path):
    path = _csv(tmp_path, _frame().assign(site="x"))
    with pytest.raises(DataError, match=r"column 'site' is not numeric"):
        sources.load_user_data([path], _columns(sensors="auto"))
    data = sources.load_user_data([path], _columns(sensors="auto", ignore=("site",)))
    assert data.train.sensors == ("a", "b")


def test_csv_nan_policy(tmp_path):
    frame = _frame()
    frame.loc[2, "b"] = np.nan
    path = _csv(tmp_path, frame)
    with pytest.raises(DataError, match=r"line 4, column 'b': nan is not a finite number"):
        sources.load_user_data([path], _columns())
    data = sources.load_user_data([path], _columns(), nan_policy="ffill")
    assert data.train.frame["b"].iloc[2] == data.train.frame["b"].iloc[1]
    frame.loc[0, "b"] = np.nan  # first row of unit 1: nothing to fill from
    with pytest.raises(DataError, match=r"line 2, column 'b'.*start of unit 1"):
        sources.load_user_data([_csv(tmp_path, frame, "lead.csv")], _columns(), nan_policy="ffill")


def test_csv_duplicates_and_order(tmp_path):
    frame = pd.concat([_frame(), _frame().iloc[[1]]], ignore_index=True)
    with pytest.raises(DataError, match=r"line 10: duplicate row for unit 1 at time=2"):
        sources.load_user_data([_csv(tmp_path, frame)], _columns())
    frame = _frame()
    frame.loc[1, "time"] = 9
    with pytest.raises(DataError, match=r"line 4: time 3 of unit 1 does not increase"):
        sources.load_user_data([_csv(tmp_path, frame, "order.csv")], _columns())


def test_duplicates_across_files_of_one_dataset(tmp_path):
    a = _csv(tmp_path, _frame(units=(1,)), "a.csv")
    _csv(tmp_path, _frame(units=(1,)), "b.csv")
    with pytest.raises(DataError, match=r"b.csv: line 2: duplicate row for unit 1"):
        sources.load_user_data([a.replace("a.csv", "*.csv")], _columns())


def test_schema_differs_between_files(tmp_path):
    _csv(tmp_path, _frame(), "a.csv")
    _csv(tmp_path, _frame(units=(3,)).rename(columns={"b": "c"}), "b.parquet")
    with pytest.raises(
        DataError, match=r"b.parquet: schema differs from .*a.csv: missing 'b'; extra 'c'"
    ):
        sources.load_user_data([str(tmp_path / "[ab].*")], _columns())
    (tmp_path / "b.parquet").unlink()
    _csv(tmp_path, _frame(units=(3,)).assign(a="x"), "c.csv")
    with pytest.raises(DataError, match=r"c.csv: column 'a' is text, but numeric in .*a.csv"):
        sources.load_user_data([str(tmp_path / "[ac].csv")], _columns())


def test_failure_flag(tmp_path):
    frame = _frame()
    frame["failed"] = 0
    frame.loc[frame.groupby("unit").tail(1).index, "failed"] = 1
    data = sources.load_user_data([_csv(tmp_path, frame)], _columns(failure="failed"))
    assert data.train.frame.groupby("unit")["rul"].min().tolist() == [0.0, 0.0]
    frame.loc[7, "failed"] = 0  # unit 2 never fails
    with pytest.raises(DataError, match=r"unit 2 never fails"):
        sources.load_user_data([_csv(tmp_path, frame, "f2.csv")], _columns(failure="failed"))
    frame.loc[7, "failed"] = 1
    frame.loc[5, "failed"] = 1  # unit 2 fails at time 2 but has later rows
    with pytest.raises(DataError, match=r"line 8: unit 2 has rows after its failure"):
        sources.load_user_data([_csv(tmp_path, frame, "f3.csv")], _columns(failure="failed"))
    frame.loc[5, "failed"] = 2
    with pytest.raises(DataError, match=r"column 'failed': failure flag must be 0 or 1"):
        sources.load_user_data([_csv(tmp_path, frame, "f4.csv")], _columns(failure="failed"))


def test_explicit_rul_column_and_negative(tmp_path):
    frame = _frame().assign(rul_true=lambda f: 100.0 - f["time"])
    data = sources.load_user_data([_csv(tmp_path, frame)], _columns(rul="rul_true"))
    assert data.train.frame["rul"].iloc[0] == 99.0
    frame.loc[3, "rul_true"] = -1
    with pytest.raises(
        DataError, match=r"line 5, column 'rul_true': RUL must be a finite number >= 0"
    ):
        sources.load_user_data([_csv(tmp_path, frame, "neg.csv")], _columns(rul="rul_true"))


def test_multiple_datasets_string_units_parquet_and_uneven_time(tmp_path):
    first = _frame().assign(unit=lambda f: "engine-" + f["unit"].astype(str))
    second = _frame(units=(1,)).assign(
        time=lambda f: f["time"] * 1.5
    )  # same unit id, other dataset
    a = _csv(tmp_path, first, "plant_a.parquet")
    b = _csv(tmp_path, second, "plant_b.csv")
    data = sources.load_user_data([a, b], _columns(), test_paths=[b])
    train = data.train
    assert train.num_units == 3
    assert list(train.unit_labels) == ["engine-1", "engine-2", 1]
    assert train.unit_dataset.tolist() == [0, 0, 1]
    assert train.frame.groupby("unit")["dataset"].first().tolist() == [0, 0, 1]
    assert train.frame[train.frame["dataset"] == 1]["rul"].tolist() == [4.5, 3.0, 1.5, 0.0]
    assert data.test is not None and data.test.frame["rul"].isna().all()  # truth unknown
    assert data.dataset_names == (a, b)
