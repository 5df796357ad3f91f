"""Batch inference from real checkpoints: `pdm_jax.inference` and scripts/predict.py.

Two short training runs (module-scoped, started together) give the checkpoints: a tiny
CNN-BiLSTM on 8 simulated devices, predicted here on 1, and a tiny TFT ensemble of two members
(config.model.ensemble) for the quantile columns.
Their report.json holds what the training loop itself predicted for each FD001 test unit's last
window with the best parameters: inference from the checkpoint alone must agree with it.
"""

import json
import logging
import shutil
import subprocess
import sys

import jax
import numpy as np
import pandas as pd
import pytest

from pdm_jax import inference
from pdm_jax.data import cmapss
from pdm_jax.errors import ConfigError, DataError
from tests.conftest import REPO, as_format_1
from tests.test_parallel import _env

pytest_plugins = ["tests.servers"]
TEST_ROWS = 13_096  # rows of test_FD001.txt


@pytest.fixture(scope="module")
def test_file():
    directory, suffix = cmapss.locate("FD001")
    return str(directory / f"test_FD001.txt{suffix}")


def _report(workdir) -> dict:
    return json.loads((workdir / "report.json").read_text())


def _script(*args: str, devices: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/predict.py", *args],
        cwd=REPO,
        env=_env(devices),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_checkpoint_from_eight_devices_predicts_the_report_on_one(runs, test_file, tmp_path):
    report = _report(runs["cnn"])
    assert report["layout"]["mesh"] == [8, 1]
    assert report["data"]["features"][-1] == "time"
    out = tmp_path / "pred.csv"
    frame = inference.predict_files(
        str(runs["cnn"]), [test_file], out, devices=jax.local_devices()[:1]
    )
    # A point model gets the p10-p90 band its run calibrated on the validation units.
    assert list(frame.columns) == ["unit", "time", "rul_pred", "rul_p10", "rul_p90"]
    assert len(frame) == 100
    per_unit = report["per_unit"]
    assert frame["unit"].tolist() == [u["unit"] for u in per_unit] == list(range(1, 101))
    for column, key in (("rul_pred", "pred"), ("rul_p10", "p10"), ("rul_p90", "p90")):
        np.testing.assert_allclose(frame[column], [u[key] for u in per_unit], rtol=1e-5, atol=1e-4)
    _assert_ordered(frame)
    history = cmapss.read_history(test_file)
    last = history.groupby("unit", sort=False)["cycle"].max().to_numpy()
    np.testing.assert_array_equal(frame["time"], last)
    written = pd.read_csv(out)
    assert list(written.columns) == list(frame.columns)
    np.testing.assert_allclose(written["rul_pred"], frame["rul_pred"], rtol=1e-6)
    assert not list(tmp_path.glob(".*tmp"))  # the temp file was renamed, not left behind


def test_checkpoint_on_s3_predicts_the_report(runs, test_file, tmp_path, s3_env):
    """A run's checkpoints uploaded to S3 (moto) as they are, predicted by the script from the
    s3:// URI alone, with only the standard AWS variables to find the server. (Training that
    writes its checkpoints to S3 is test_resume's.)"""
    import fsspec

    uri = s3_env.make_bucket() + "/run"
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.put(f"{runs['cnn'] / 'checkpoints'}/", uri.removeprefix("s3://"), recursive=True)
    out = tmp_path / "pred.csv"
    proc = _script(f"--checkpoint={uri}", f"--input={test_file}", f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    frame = pd.read_csv(out)
    report = _report(runs["cnn"])
    assert frame["unit"].tolist() == [u["unit"] for u in report["per_unit"]]
    np.testing.assert_allclose(
        frame["rul_pred"], [u["pred"] for u in report["per_unit"]], rtol=1e-5, atol=1e-4
    )


def test_all_steps_gives_a_row_per_input_row_ending_in_the_default(runs, test_file):
    default = inference.predict_files(str(runs["cnn"]), [test_file], show_progress=False)
    every = inference.predict_files(
        str(runs["cnn"]), [test_file], all_steps=True, show_progress=False
    )
    assert len(every) == TEST_ROWS
    history = cmapss.read_history(test_file)
    np.testing.assert_array_equal(every["unit"], history["unit"].astype(int))
    np.testing.assert_array_equal(every["time"], history["cycle"].astype(int))
    last = every.groupby("unit", sort=False).tail(1).reset_index(drop=True)
    np.testing.assert_array_equal(last[["unit", "time"]], default[["unit", "time"]])
    # Batches of 1024 windows here, of 100 there: equal up to float reassociation.
    np.testing.assert_allclose(last["rul_pred"], default["rul_pred"], rtol=1e-5, atol=1e-4)


def test_step_selection(runs, test_file):
    uri = str(runs["cnn"] / "checkpoints")
    steps = sorted(int(p.name) for p in (runs["cnn"] / "checkpoints").iterdir() if p.name.isdigit())
    latest = inference.predict_files(uri, [test_file], step="latest", show_progress=False)
    by_number = inference.predict_files(uri, [test_file], step=str(steps[-1]), show_progress=False)
    pd.testing.assert_frame_equal(latest, by_number)
    with pytest.raises(ConfigError, match=r"--step=7: no such step .*steps: 20"):
        inference.read_saved(uri, 7)
    with pytest.raises(ConfigError, match="--step: expected best, latest or a step number"):
        inference.read_saved(uri, "first")


def _assert_ordered(frame: pd.DataFrame) -> None:
    """Every row's quantile columns ascend through its point prediction: a band never excludes
    the prediction it is drawn around."""
    columns = sorted(c for c in frame.columns if c[:5] == "rul_p" and c[5:6].isdigit())
    assert columns
    values = frame[columns].to_numpy()
    point = frame["rul_pred"].to_numpy()[:, None]
    below, above = values[:, : len(columns) // 2], values[:, len(columns) // 2 :]
    assert (np.diff(values, axis=1) >= 0).all()
    assert (below <= point).all() and (above >= point).all()


def test_tft_quantile_columns_bracket_the_median(runs, test_file, tmp_path):
    report = _report(runs["tft"])
    assert json.loads((runs["tft"] / "config.json").read_text())["model"]["ensemble"] == 2
    out = tmp_path / "pred.parquet"
    raw = inference.predict_files(f"file://{runs['tft']}", [test_file], out, intervals="raw")
    assert list(raw.columns) == ["unit", "time", "rul_pred", "rul_p10", "rul_p90"]
    np.testing.assert_allclose(
        raw["rul_pred"], [u["pred"] for u in report["per_unit"]], rtol=1e-5, atol=1e-4
    )
    _assert_ordered(raw)
    pd.testing.assert_frame_equal(pd.read_parquet(out), raw)
    # By default the band is the calibrated one the report scored, not the model's own.
    frame = inference.predict_files(f"file://{runs['tft']}", [test_file])
    assert list(frame.columns) == list(raw.columns)
    pd.testing.assert_series_equal(frame["rul_pred"], raw["rul_pred"])
    _assert_ordered(frame)
    for column, key in (("rul_p10", "p10"), ("rul_p90", "p90")):
        np.testing.assert_allclose(
            frame[column], [u[key] for u in report["per_unit"]], rtol=1e-5, atol=1e-4
        )
        assert not np.allclose(frame[column], raw[column])
    assert report["calibration"]["step"] == report["best_step"]
    assert {"coverage_p10_p90", "coverage_p10_p90_raw"} <= set(report["test"])


def test_format_1_checkpoint_predicts_without_a_band(runs, test_file, tmp_path, caplog):
    store = tmp_path / "checkpoints"
    shutil.copytree(runs["cnn"] / "checkpoints", store)
    as_format_1(store)
    with caplog.at_level(logging.INFO, logger="pdm_jax.inference"):
        frame = inference.predict_files(str(store), [test_file], devices=jax.local_devices()[:1])
    assert list(frame.columns) == ["unit", "time", "rul_pred"]
    np.testing.assert_allclose(
        frame["rul_pred"], [u["pred"] for u in _report(runs["cnn"])["per_unit"]], atol=1e-4
    )
    assert "no calibrated p10-p90 band: checkpoint format 1 holds none" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pdm_jax.inference"):
        inference.load(str(runs["cnn"]), devices=jax.local_devices()[:1])
    assert "p10-p90 band: split-conformal, fitted on validation (" in caplog.text
    raw = inference.predict_files(str(runs["cnn"]), [test_file], intervals="raw")
    assert list(raw.columns) == ["unit", "time", "rul_pred"]


def test_user_csv_extra_columns_and_short_units(runs, test_file, tmp_path, caplog):
    """The training layout as a CSV (any unit order) predicts like the text file; an unknown
    column is ignored with a warning, a unit shorter than the window is padded, counted, and a
    unit whose record starts late is named (its baseline inputs need the start)."""
    history = cmapss.read_history(test_file)
    history["unit"] = history["unit"].astype(int)
    history["cycle"] = history["cycle"].astype(int)
    history["operator_note"] = "ok"
    short = history[history["unit"] == 7].head(5)
    late = history[history["unit"] == 12].iloc[19:]  # its record starts at cycle 20
    rest = history[~history["unit"].isin([7, 12])]
    path = tmp_path / "units.csv"
    pd.concat([short, late, rest]).to_csv(path, index=False)
    caplog.set_level(logging.WARNING, logger="pdm_jax.inference")
    frame = inference.predict_files(str(runs["cnn"]), [str(path)], show_progress=False)
    messages = [r.getMessage() for r in caplog.records]
    assert any("ignoring 1 column(s)" in m and "'operator_note'" in m for m in messages)
    assert any("1 unit(s) are shorter than the window (30 steps)" in m for m in messages)
    # The model's baseline inputs (data.baseline_cycles=5) need records from their start.
    (started_late,) = [m for m in messages if "start at time" in m]
    assert "1 unit(s) (12) start at time 20 or later, while training records started at 1" in (
        started_late
    )
    assert frame["unit"].tolist()[:3] == [7, 12, 1]  # the file's order
    assert frame["time"].iloc[0] == 5 and np.isfinite(frame["rul_pred"]).all()
    reference = inference.predict_files(str(runs["cnn"]), [test_file], show_progress=False)
    merged = frame.iloc[2:].merge(reference, on="unit", suffixes=("", "_ref"))
    assert len(merged) == 98
    np.testing.assert_allclose(merged["rul_pred"], merged["rul_pred_ref"], rtol=1e-5, atol=1e-4)


def test_values_in_other_units_are_warned_once_per_file(runs, test_file, tmp_path, caplog):
    """Temperatures in degrees Celsius instead of the training data's Rankine sit far outside the
    training range: one warning per file naming the columns, even over many chunks; the real file
    raises none."""
    caplog.set_level(logging.WARNING, logger="pdm_jax.inference")
    inference.predict_files(str(runs["cnn"]), [test_file], show_progress=False)
    assert not [r for r in caplog.records if "far outside" in r.getMessage()]
    history = cmapss.read_history(test_file)
    for col in ("s_2", "s_3"):
        history[col] = (history[col] - 491.67) * 5 / 9
    path = tmp_path / "celsius.csv"
    history.to_csv(path, index=False)
    caplog.clear()
    inference.predict_files(str(runs["cnn"]), [str(path)], show_progress=False, chunk_rows=2000)
    warned = [r.getMessage() for r in caplog.records if "far outside" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "'s_2' (median 83." in warned[0] and "training range 641" in warned[0]
    assert "'s_3'" in warned[0] and "'s_4'" not in warned[0]
    assert "different units or scale" in warned[0]


def test_several_inputs_are_told_apart_by_file(runs, test_file, tmp_path):
    history = cmapss.read_history(test_file)
    part = tmp_path / "part.parquet"
    history[history["unit"] <= 3].to_parquet(part)
    frame = inference.predict_files(str(runs["cnn"]), [test_file, part], show_progress=False)
    assert list(frame.columns) == ["file", "unit", "time", "rul_pred", "rul_p10", "rul_p90"]
    assert frame["file"].value_counts().to_dict() == {test_file: 100, str(part): 3}
    ours = frame[frame["file"] == str(part)].reset_index(drop=True)
    theirs = frame[frame["file"] == test_file].head(3).reset_index(drop=True)
    np.testing.assert_allclose(ours["rul_pred"], theirs["rul_pred"], rtol=1e-5, atol=1e-4)


def test_script_shards_over_eight_devices_and_writes_parquet(runs, test_file, tmp_path):
    out = tmp_path / "pred.parquet"
    proc = _script(
        f"--checkpoint={runs['cnn'] / 'checkpoints'}",
        f"--input={test_file}",
        f"--output={out}",
        "--all_steps",
        "--batch_size=1001",  # rounded up to 1008, a multiple of the 8 devices
        "--intervals=raw",  # the model's own outputs: a point model has no band then
        devices=8,
    )
    assert proc.returncode == 0, proc.stderr
    assert "(batch 1008 over 8 device(s))" in proc.stderr
    assert f"{TEST_ROWS}/{TEST_ROWS} windows" in proc.stderr and "windows/s" in proc.stderr
    frame = pd.read_parquet(out)
    one = inference.predict_files(
        str(runs["cnn"]), [test_file], all_steps=True, show_progress=False
    )
    assert list(frame.columns) == ["unit", "time", "rul_pred"]
    assert list(one.columns) == ["unit", "time", "rul_pred", "rul_p10", "rul_p90"]
    np.testing.assert_array_equal(frame[["unit", "time"]], one[["unit", "time"]])
    np.testing.assert_allclose(frame["rul_pred"], one["rul_pred"], rtol=1e-5, atol=1e-4)


def test_the_readmes_example_runs_as_written(runs, tmp_path):
    """The README's batch-inference command, with the main job's run directory (a TFT) and the
    output file swapped for this test's: its input ships in the clone."""
    line = next(
        ln
        for ln in (REPO / "README.md").read_text().splitlines()
        if ln.startswith("python scripts/predict.py --checkpoint=runs/fd001")
    )
    args = line.split()[2:]
    args = [f"--checkpoint={runs['tft']}" if a.startswith("--checkpoint=") else a for a in args]
    args = [f"--output={tmp_path / 'pred.csv'}" if a.startswith("--output=") else a for a in args]
    proc = _script(*args)
    assert proc.returncode == 0, proc.stderr
    frame = pd.read_csv(tmp_path / "pred.csv")
    assert list(frame.columns) == ["unit", "time", "rul_pred", "rul_p10", "rul_p90"]
    assert len(frame) == 100
    _assert_ordered(frame)


def test_streamed_prediction_matches_the_whole_file(runs, test_file, tmp_path):
    """Inputs read 1000 rows at a time (units straddle the cuts) and predictions written as they
    come give the rows the in-memory prediction gives, for each input and output format."""
    history = cmapss.read_history(test_file)
    tft = str(runs["tft"])
    whole = inference.predict_files(tft, [test_file], show_progress=False)
    out = tmp_path / "tft.csv.gz"
    rows = inference.predict_to_file(tft, [test_file], out, chunk_rows=1000, show_progress=False)
    assert rows == 100
    streamed = pd.read_csv(out)
    assert list(streamed.columns) == ["unit", "time", "rul_pred", "rul_p10", "rul_p90"]
    np.testing.assert_array_equal(streamed[["unit", "time"]], whole[["unit", "time"]])
    np.testing.assert_allclose(streamed.iloc[:, 2:], whole.iloc[:, 2:], rtol=1e-5, atol=1e-4)

    table = tmp_path / "history.parquet"
    history.to_parquet(table, index=False)
    cnn = str(runs["cnn"])
    every = inference.predict_files(cnn, [test_file], all_steps=True, show_progress=False)
    out = tmp_path / "every.parquet"
    rows = inference.predict_to_file(
        cnn, [table], out, all_steps=True, chunk_rows=777, show_progress=False
    )
    assert rows == TEST_ROWS
    streamed = pd.read_parquet(out)
    np.testing.assert_array_equal(streamed[["unit", "time"]], every[["unit", "time"]])
    np.testing.assert_allclose(streamed["rul_pred"], every["rul_pred"], rtol=1e-5, atol=1e-4)
    assert not list(tmp_path.glob(".*tmp"))


def test_script_error_deep_in_a_streamed_input_leaves_no_output(runs, test_file, tmp_path):
    """A bad value in the 12th of 14 chunks: earlier chunks were already predicted and written
    to the temp file, yet the one-line error leaves nothing behind."""
    history = cmapss.read_history(test_file)
    history["s_4"] = history["s_4"].astype(object)
    history.loc[history.index[12_000], "s_4"] = "broken"
    path = tmp_path / "bad.csv"
    history.to_csv(path, index=False)
    out = tmp_path / "pred.csv"
    proc = _script(
        f"--checkpoint={runs['cnn']}", f"--input={path}", f"--output={out}", "--chunk_rows=1000"
    )
    assert proc.returncode == 2, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: {path}: line 12002, column 's_4': 'broken' is not a number"]
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == [path]
    with pytest.raises(ConfigError, match="--chunk_rows: expected an integer >= 1"):
        inference.predict_to_file(str(runs["cnn"]), [path], out, chunk_rows=0)
    assert not out.exists()


def test_script_missing_sensor_column_is_one_error_line_and_no_output(runs, test_file, tmp_path):
    history = cmapss.read_history(test_file).drop(columns=["s_3", "s_11"])
    path = tmp_path / "no_s3.csv"
    history.to_csv(path, index=False)
    out = tmp_path / "pred.csv"
    proc = _script(f"--checkpoint={runs['cnn']}", f"--input={path}", f"--output={out}")
    assert proc.returncode == 2, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "'s_3', 's_11'" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == [path]


def test_script_nonexistent_checkpoint_is_one_error_line(tmp_path, test_file):
    out = tmp_path / "pred.csv"
    proc = _script(
        f"--checkpoint={tmp_path / 'no_such_run'}", f"--input={test_file}", f"--output={out}"
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: --checkpoint: {tmp_path / 'no_such_run'}: no such checkpoint store or run "
        "directory"
    ]
    assert not out.exists()


def test_library_errors_name_the_problem(runs, tmp_path):
    bad = tmp_path / "text.csv"
    bad.write_text("unit,cycle\n1,1\n")
    with pytest.raises(DataError, match=r"text\.csv: missing column\(s\) 'setting_1'") as err:
        inference.predict_files(str(runs["cnn"]), [str(bad)], show_progress=False)
    # Every column the checkpoint reads is named, so one error says how to fix the whole file.
    reads = "unit, cycle, setting_1, setting_2, setting_3, s_2, s_3, s_4, s_7, s_8, s_9, s_11"
    assert f"the checkpoint's model reads {reads}, " in str(err.value)
    assert str(err.value).endswith("s_21 (C-MAPSS names, as the model was trained on C-MAPSS)")
    timed = tmp_path / "timed.csv"
    timed.write_text("unit,time\n1,1\n")
    with pytest.raises(DataError, match=r"missing column\(s\) 'cycle', 'setting_1'"):
        inference.predict_files(str(runs["cnn"]), [str(timed)], show_progress=False)
    with pytest.raises(ConfigError, match=r"--output: .*unsupported extension"):
        inference.predict_files(str(runs["cnn"]), [str(bad)], tmp_path / "out.xlsx")
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        inference.predict_files(str(tmp_path), [str(bad)])


def test_quantile_column_names():
    assert [inference.quantile_column(q) for q in (0.1, 0.9, 0.05, 0.975)] == [
        "rul_p10",
        "rul_p90",
        "rul_p05",
        "rul_p97.5",
    ]
