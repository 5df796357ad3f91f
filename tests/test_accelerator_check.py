"""scripts/accelerator_check.sh, the prepared GPU/TPU check, runs end to end here on CPU in its
quick mode: platform block, a benchmark row, a SIGKILL after the first checkpoint
and a resume that finishes the run, and the summary files. (Speeds are never asserted.)"""

import argparse
import json
import os
import subprocess
import sys

from pdm_jax.configuration import load_module
from tests.conftest import REPO


def test_accelerator_check_quick_on_cpu(tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        [
            "bash",
            "scripts/accelerator_check.sh",
            str(out),
            "--quick",
            "--models=cnn_bilstm",
            "--dtypes=bfloat16",  # float32 is test_benchmark's; this keeps the suite short
            "--shapes=peers",
            "--budget_s=400",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=450,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "platform: cpu" in proc.stdout and "infer_microbatch" in proc.stdout
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    speed = [r for r in rows if r["step"] == "speed"]
    assert [(r["model"], r["dtype"], r["shape"]) for r in speed] == [
        ("cnn_bilstm", "bfloat16", "peers")
    ]
    assert speed[0]["inputs"] == 14 and speed[0]["window"] == 30  # the peers' 14 sensors
    assert all(r["status"] == "ok" and r["train_samples_per_s"] > 0 for r in speed)
    assert all(r["infer_windows_per_s"] > 0 and r["peak_bytes"] is None for r in speed)
    (resumed,) = [r for r in rows if r["step"] == "resume"]
    assert resumed["status"] == "ok", resumed
    assert resumed["resumed_from_step"] == resumed["killed_after_step"] > 0
    assert resumed["final_step"] == 12 and resumed["test_rmse"] > 0
    summary = (out / "summary.md").read_text()
    assert "| speed | cnn_bilstm | peers | bfloat16 |" in summary and "| resume |" in summary


def test_accelerator_check_refuses_what_it_cannot_run(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", "scripts/accelerator_check.sh", str(tmp_path), "--models=lstm"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "unknown model, dtype or shape: lstm" in proc.stderr


def test_accelerator_check_benchmarks_the_tft_at_nvidias_reference_shapes():
    """The NVIDIA row: hidden 128, 4 heads, 192-step windows on synthetic data; the TFT only."""
    check = load_module(REPO / "scripts" / "accelerator_check.py")
    args = argparse.Namespace(batch=256, steps=100, quick=False)
    cmd = check.benchmark_command(args, "tft", "bfloat16", "nvidia")
    assert {"--set=model.tft.hidden=128", "--set=model.tft.heads=4", "--window=192"} <= set(cmd)
    assert any(c.startswith("--synthetic_units=") for c in cmd)
    assert "cnn_bilstm" not in check.SHAPES["nvidia"]
    peers = check.benchmark_command(args, "tft", "float32", "peers")
    assert {"--set=data.baseline_cycles=0", "--set=data.use_time=False"} <= set(peers)
