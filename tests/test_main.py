"""The command-line entry, run as a user runs it: a subprocess of `python -m pdm_jax.main`."""

import json
import struct
import subprocess
import sys

import pandas as pd
import pytest

from tests.conftest import REPO


def _main(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "pdm_jax.main", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
    )


def test_main_runs_the_data_path_on_embedded_fd001(tmp_path):
    proc = _main("--config=configs/tft.py", f"--workdir={tmp_path}", "--mode=data")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "data_summary.json").read_text())
    assert summary["train_windows"] + summary["val_windows"] == 17731
    assert summary["test_windows"] == 100 and summary["num_conditions"] == 1
    assert summary["iterator_state"]["next_batch"] == summary["epoch_batches"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"]["name"] == "tft" and config["data"]["subset"] == "FD001"
    scaler = json.loads((tmp_path / "scaler.json").read_text())
    assert len(scaler["features"]) == 15 and scaler["features"][-1] == "time"  # 14 sensors, age
    # The main job's TFT also reads each sensor's change since the unit's first 40 cycles.
    assert config["data"]["baseline_cycles"] == 40 and config["data"]["use_time"]


def test_bad_config_value_is_one_line_exit_2(tmp_path):
    proc = _main(
        "--config=configs/cnn_bilstm.py", f"--workdir={tmp_path}", "--config.data.window=0"
    )
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors == ["error: config.data.window: expected an integer > 0, got 0"]
    assert proc.stderr.strip().splitlines()[-1] == errors[0]
    # A password inside the tracking URI is refused without being repeated anywhere.
    uri = "https://alice:pdm-secret-4c7e@mlflow.example.com"
    proc = _main(
        "--config=configs/tft.py", f"--workdir={tmp_path}", f"--config.tracking.mlflow_uri={uri}"
    )
    assert proc.returncode == 2 and "config.tracking.mlflow_uri" in proc.stderr
    assert "pdm-secret" not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("key", "value", "devices", "line"),
    [
        ("model.name", "xgb", 1, "config.model.name: expected one of"),
        ("model.quantiles", (0.5, 1.5), 1, "config.model.quantiles: expected"),
        ("data.window", -3, 1, "config.data.window: expected an integer > 0"),
        ("train.batch_size", 12, 8, "config.train.batch_size:"),
        ("train.grad_accum", 5, 1, "config.train.grad_accum:"),
        ("checkpoint.every_steps", 300, 1, "config.checkpoint.every_steps:"),
        ("compute.mesh", (4, 1), 1, "config.compute.mesh:"),
    ],
)
def test_each_kind_of_bad_config_is_one_line(key, value, devices, line):
    """What `main` checks before any work, in-process: the config's own checks, then the layout
    for `devices` CPU devices (a recorded snapshot); `main` prints the error's one line and exits
    2, as the subprocess test above checks."""
    from pdm_jax import configuration, hardware
    from pdm_jax.errors import ConfigError
    from tests.conftest import load_config
    from tests.test_hardware import devices as cpu_devices

    cfg = load_config("tft")
    section, name = key.split(".")
    cfg[section][name] = value
    detected = hardware.detect(
        hardware.Snapshot.from_dict(
            {"devices": cpu_devices("cpu", devices, backend="cpu"), "cpu_count": 2}
        )
    )
    with pytest.raises(ConfigError) as err:
        configuration.validate(cfg)
        hardware.decide(detected, cfg)
    assert str(err.value).startswith(line) and "\n" not in str(err.value)


def test_bad_data_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"unit": [1, 1], "time": [1, 1], "a": [0.1, 0.2]}).to_csv(bad, index=False)
    proc = _main(
        "--config=configs/tft.py",
        f"--workdir={tmp_path / 'w'}",
        "--config.data.source=csv",
        f"--config.data.paths=('{bad}',)",
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "duplicate row for unit 1" in lines[-1]
    assert "Traceback" not in proc.stderr


def test_csv_run_with_tuple_overrides_from_the_command_line(tmp_path):
    rows = [
        {"engine": f"e{u}", "t": t, "load": 1.0, "temp": 20.0, "vib": u + t * 0.1, "rpm": 3.0 * t}
        for u in range(1, 13)
        for t in range(1, 41)
    ]
    path = tmp_path / "fleet.parquet"
    pd.DataFrame(rows).to_parquet(path, index=False)
    proc = _main(
        "--config=configs/cnn_bilstm.py",
        f"--workdir={tmp_path / 'w'}",
        "--config.data.source=csv",
        f"--config.data.paths=('{path}',)",
        "--config.data.columns.unit=engine",
        "--config.data.columns.time=t",
        "--config.data.columns.settings=('load','temp')",
        "--config.data.columns.sensors=('vib','rpm')",
        "--config.data.window=10",
        "--config.train.batch_size=32",
        "--mode=data",
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "w" / "data_summary.json").read_text())
    assert summary["features"] == ["vib", "rpm", "time"]  # the CNN-BiLSTM config feeds the age
    assert summary["train_windows"] + summary["val_windows"] == 12 * 31


def test_synthetic_source(tmp_path):
    proc = _main(
        "--config=configs/tft.py",
        f"--workdir={tmp_path}",
        "--config.data.source=synthetic",
        "--config.data.synthetic.num_units=20",
        "--config.data.synthetic.num_conditions=6",
        "--mode=data",
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "data_summary.json").read_text())
    assert summary["num_conditions"] == 6 and summary["train_units"] == 16


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    test_cmd = next(ln for ln in ci.splitlines() if "pytest" in ln and not ln.startswith("#"))
    assert test_cmd in readme


def _tensorboard_scalars(tb_dir) -> dict[str, list[tuple[int, float]]]:
    """Reads the TFRecord-framed Event protos back (length, crc, payload, crc)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_main_trains_and_reports(tmp_path):
    proc = _main(
        "--config=configs/cnn_bilstm.py",
        f"--workdir={tmp_path}",
        "--config.train.num_steps=12",
        "--config.train.eval_every=6",
        "--config.train.batch_size=64",
        "--config.model.cnn_bilstm.channels=(8,)",
        "--config.model.cnn_bilstm.dilations=(1,)",
        "--config.model.cnn_bilstm.lstm_hidden=8",
        "--config.model.cnn_bilstm.dense=8",
    )
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_rmse" in r]
    assert [r["step"] for r in evals] == [6, 12]
    assert all(r["val_rmse"] > 0 and r["loss"] > 0 for r in evals)
    assert records[-1]["step"] == 12 and records[-1]["test_rmse"] > 0
    scalars = _tensorboard_scalars(tmp_path / "tb")
    assert [step for step, _ in scalars["val/rmse"]] == [6, 12]
    assert scalars["val/rmse"][-1][1] == pytest.approx(evals[-1]["val_rmse"], rel=1e-6)
    assert scalars["train/loss"] and scalars["test/rmse"]
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["packages"]["jax"] and info["data"]["fingerprint"]
    # The command as typed, to paste back (sys.argv would say .../pdm_jax/main.py).
    assert info["command"].startswith("python -m pdm_jax.main --config=configs/cnn_bilstm.py ")
    assert set(info) >= {"platform", "layout"} and "layout" not in info["layout"]
    assert info["platform"]["backend"] == "cpu"
    assert info["layout"]["grad_accum"] == 1
    resolved = json.loads((tmp_path / "config.json").read_text())
    assert resolved["train"]["grad_accum"] == 1 and resolved["compute"]["dtype"] == "float32"
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"] == 12 and report["best_step"] in (6, 12)
    assert report["test"]["count"] == 100 and report["test"]["rmse"] > 0
    assert len(report["per_unit"]) == 100 and report["per_unit"][0]["unit"] == 1
