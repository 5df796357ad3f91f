"""scripts/benchmark.py runs and prints the JSON keys people rely on (speed never asserted)."""

import json
import subprocess
import sys

from tests.conftest import REPO


def test_benchmark_smoke_prints_every_measurement():
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/benchmark.py",
            "--model=cnn_bilstm",
            "--batch=32",
            "--steps=3",
            "--warmup=1",
            "--infer_batch=64",
            "--what=train,infer,data,memory,checkpoint",
            "--storage=local",
            "--save_every=3",
            "--saves=1",
            "--synthetic_units=60",
            "--set=model.cnn_bilstm.lstm_hidden=8",
            "--set=model.cnn_bilstm.channels=(8, 8)",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    records = {r["what"]: r for r in map(json.loads, proc.stdout.strip().splitlines())}
    assert set(records) == {"train", "infer", "data", "memory", "checkpoint"}
    common = {
        "model",
        "params",
        "batch",
        "window",
        "dtype",
        "device_kind",
        "device_count",
        "jax",
        "flax",
    }
    for record in records.values():
        assert common <= set(record)
        assert record["model"] == "cnn_bilstm" and record["params"] > 0
        assert record["data_source"] == "synthetic:60" and record["train_windows"] > 0
    train = records["train"]
    assert {
        "compile_s",
        "train_samples_per_s",
        "step_ms_p50",
        "step_ms_p90",
        "peak_host_rss_mb",
        "peak_bytes",  # null on CPU
    } <= set(train)
    assert train["peak_bytes"] is None
    assert train["train_samples_per_s"] > 0
    assert records["infer"]["infer_windows_per_s"] > 0
    assert records["data"]["data_windows_per_s"] > 0
    assert records["memory"]["temp_bytes"] > 0 and records["memory"]["temp_bytes_remat"] > 0
    saved = records["checkpoint"]
    assert saved["backend"] == "file" and saved["save_every"] == 3
    assert 0 < saved["save_blocking_s_p50"] <= saved["save_total_s_p50"]
    assert saved["restore_s_p50"] > 0 and saved["state_mib"] > 0
    assert {"train_s_without_saves", "train_s_with_one_save", "overhead_pct"} <= set(saved)


def test_benchmark_set_overrides_the_config_and_bad_ones_are_one_line():
    proc = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--set=model.no_such_key=1", "--what=data"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --set:"), proc.stderr[-500:]
