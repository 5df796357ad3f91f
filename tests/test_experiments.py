"""scripts/experiments.py (and experiments/tables.py): real main-job runs on tiny synthetic rows,
resume, failure, the table.

Each `pdm_jax.main` subprocess costs 10-30 s here (JAX import and compile), so one test walks
through the whole lifecycle (first run with a failing row, a no-op rerun, a rerun after a line
was deleted) with four main runs in total; everything else needs none.
"""

import json
import math
import os
import shlex
import subprocess
import sys
import textwrap
import time

from pdm_jax.configuration import load_module
from tests.conftest import REPO

experiments = load_module(REPO / "scripts" / "experiments.py")

# Shared by every row via --set, so the flag is exercised too; the plan keeps per-row keys.
TINY_SETS = [
    "data.source=synthetic",
    "data.synthetic.num_units=12",
    "data.synthetic.test_units=6",
    "train.num_steps=3",
    "train.eval_every=3",
    "checkpoint.every_steps=3",
    "train.batch_size=32",
    "train.tensorboard=False",
    "train.plots=False",
]
TINY_PLAN = textwrap.dedent(
    """
    SMALL = {
        "data.window": 10,
        "model.cnn_bilstm.channels": (8, 8),
        "model.cnn_bilstm.lstm_hidden": 8,
        "model.cnn_bilstm.dense": 8,
    }


    def get_plan():
        rows = [
            {
                "id": f"tiny-s{seed}",
                "config": "configs/cnn_bilstm.py",
                "overrides": {**SMALL, "seed": seed},
                "group": "tiny",
                "seed": seed,
            }
            for seed in (0, 1)
        ]
        rows.append(
            {
                "id": "broken-s0",
                "config": "configs/cnn_bilstm.py",
                "overrides": {**SMALL, "data.window": 0},
                "group": "broken",
                "seed": 0,
            }
        )
        return rows
    """
)


def _runner(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "scripts/experiments.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=timeout,
    )


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_runs_resumes_and_retries_only_missing_rows(tmp_path):
    plan = tmp_path / "tiny.py"
    plan.write_text(TINY_PLAN)
    results = tmp_path / "results" / "tiny.jsonl"
    table = results.with_suffix(".md")
    runs = tmp_path / "runs"
    common = [f"--plan={plan}", f"--results={results}", f"--runs_dir={runs}"]
    common += [f"--set={item}" for item in TINY_SETS]

    # 1. Everything: two rows finish, the invalid one fails without stopping the others.
    proc = _runner(*common)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout.splitlines()
    assert out[0].startswith("[1/3] tiny-s0 ... done in ") and ": test RMSE " in out[0]
    assert out[1].startswith("[2/3] tiny-s1 ... done in ")
    assert out[2].startswith("[3/3] broken-s0 ... FAILED after ")
    assert "config.data.window: expected an integer > 0, got 0" in out[2]
    assert "1 failed (broken-s0)" in out[3]
    records = _lines(results)
    assert [r["id"] for r in records] == ["tiny-s0", "tiny-s1"]
    for record, seed in zip(records, (0, 1), strict=True):
        assert math.isfinite(record["test_rmse"]) and record["test_rmse"] > 0
        assert math.isfinite(record["test_phm08"]) and record["test_count"] == 6
        assert record["seed"] == seed and record["model"] == "cnn_bilstm"
        assert record["group"] == "tiny" and record["data_source"] == "synthetic"
        assert record["steps"] == 3 and record["best_step"] == 3
        assert record["wall_seconds"] > 0 and record["train_seconds"] > 0
        assert record["finished_at"].endswith("+00:00") and record["hostname"]
        assert {"cpu_count", "git_commit", "plan", "jax_version"} <= set(record)
        assert record["overrides"]["train.num_steps"] == "3"
        assert record["overrides"]["model.cnn_bilstm.channels"] == "(8, 8)"
        argv = shlex.split(record["command"])
        assert argv[:3] == ["python", "-m", "pdm_jax.main"]  # rerunnable on any machine
        assert f"--workdir={runs / record['id']}" in argv
        assert (runs / record["id"] / "run.log").is_file()
    broken_log = (runs / "broken-s0" / "run.log").read_text()
    assert "error: config.data.window" in broken_log and "exit code 2" in broken_log

    text = table.read_text()
    assert "2 of 3 planned rows finished" in text
    rmse = [r["test_rmse"] for r in records]
    worst = max(records, key=lambda r: r["test_rmse"])
    mean, std = (sum(rmse) / 2, abs(rmse[0] - rmse[1]) / math.sqrt(2))
    summary = f"| tiny |  | 2/2 | {mean:.2f} ± {std:.2f} |"
    assert summary in text and f"s{worst['seed']} ({worst['test_rmse']:.2f})" in text
    assert "| broken |  | 0/1 | - |" in text
    assert f"| tiny-s0 | tiny | done | {records[0]['test_rmse']:.2f} |" in text
    assert "| broken-s0 | broken | pending |" in text
    # Copy-paste commands: the recorded one for finished rows, the planned one for pending rows.
    portable = shlex.join(["python", *shlex.split(records[1]["command"])[1:]])
    assert f"# tiny-s1\n{portable}\n" in text
    assert "# broken-s0 (pending)\npython -m pdm_jax.main " in text
    assert "--config.data.window=0" in text

    # 2. Again: both finished rows are skipped without starting the main job.
    before = results.read_bytes()
    log_before = (runs / "tiny-s0" / "run.log").read_bytes()
    start = time.perf_counter()
    proc = _runner(*common, "--only=^tiny")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert time.perf_counter() - start < 20
    assert proc.stdout.splitlines()[:2] == [
        "[1/2] tiny-s0 ... skipped (already recorded)",
        "[2/2] tiny-s1 ... skipped (already recorded)",
    ]
    assert results.read_bytes() == before
    assert (runs / "tiny-s0" / "run.log").read_bytes() == log_before

    # 3. A deleted line: only that row runs again.
    kept = before.decode().splitlines(keepends=True)[0]
    results.write_text(kept)
    proc = _runner(*common, "--only=tiny")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout.splitlines()
    assert out[0] == "[1/2] tiny-s0 ... skipped (already recorded)"
    assert out[1].startswith("[2/2] tiny-s1 ... done in ")
    assert results.read_text().startswith(kept)
    assert [r["id"] for r in _lines(results)] == ["tiny-s0", "tiny-s1"]
    assert (runs / "tiny-s0" / "run.log").read_bytes() == log_before
    assert "2 of 3 planned rows finished" in table.read_text()


def test_first_bar_plan_dry_run_and_flag_errors(tmp_path):
    plan = experiments.tables.load_plan(REPO / "experiments" / "first_bar.py")
    ids = [row["id"] for row in plan]
    assert len(ids) == len(set(ids)) == 18
    better = [row for row in plan if row.get("better_model")]
    assert {(row["model"], row["subset"]) for row in better} == {
        ("cnn_bilstm", "FD002"),
        ("cnn_bilstm", "FD003"),
    }
    main_cells = {(r["model"], r["subset"], r["seed"]) for r in plan if not r["better_model"]}
    assert main_cells == {
        (m, s, seed)
        for m in ("tft", "cnn_bilstm")
        for s in ("FD001", "FD004")
        for seed in (0, 1, 2)
    }
    assert plan[0]["overrides"] == {"data.subset": "FD001", "seed": 0}

    results = tmp_path / "r" / "first_bar.jsonl"
    runs = tmp_path / "runs"
    proc = _runner(
        f"--results={results}", f"--runs_dir={runs}", "--dry_run", "--only=FD00[14]-s0", "--set",
        "train.patience=20", "--data_dir=/data/cmapss",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    commands = [ln.strip() for ln in proc.stdout.splitlines() if ln.startswith("  ")]
    assert len(commands) == 4
    assert commands[0] == shlex.join(
        [
            sys.executable,
            "-m",
            "pdm_jax.main",
            "--config=configs/tft.py",
            f"--workdir={runs / 'tft-FD001-s0'}",
            "--data_dir=/data/cmapss",
            "--config.data.subset=FD001",
            "--config.seed=0",
            "--config.train.patience=20",
        ]
    )
    assert not results.parent.exists() and not runs.exists()

    assert _runner(f"--results={results}", "--only=nothing-matches").returncode == 2
    proc = _runner(f"--results={results}", "--set=novalue", "--dry_run")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --set")


def test_table_summary_is_exact_on_hand_made_results():
    plan = [
        {"id": f"m-FD001-s{s}", "config": "c.py", "overrides": {}, "group": "m FD001"}
        for s in range(3)
    ] + [
        {"id": "m-FD002-s0", "config": "c.py", "overrides": {}, "group": "m FD002", "note": "x"},
        {"id": "m-FD002-s1", "config": "c.py", "overrides": {}, "group": "m FD002", "note": "x"},
        {"id": "m-FD003-s0", "config": "c.py", "overrides": {}, "group": "m FD003"},
    ]

    def rec(row_id, seed, rmse, phm08, train_s, coverage=None):
        return {
            "test_coverage": coverage,
            "id": row_id,
            "seed": seed,
            "test_rmse": rmse,
            "test_mae": rmse / 2,
            "test_phm08": phm08,
            "val_rmse": 1.0,
            "best_step": 10,
            "steps": 20,
            "train_seconds": train_s,
            "wall_seconds": train_s + 5,
            "command": "/venv/bin/python -m pdm_jax.main --config=c.py --workdir=runs/x",
            "finished_at": "2025-01-02T03:04:05+00:00",
            "hostname": "h",
            "git_commit": "0123456789abcdef",
        }

    results = {
        "m-FD001-s0": rec("m-FD001-s0", 0, 10.0, 100.0, 100.0, 0.75),
        "m-FD001-s1": rec("m-FD001-s1", 1, 14.0, 300.0, 200.0, 0.81),
        "m-FD001-s2": rec("m-FD001-s2", 2, 12.0, 200.0, 300.0),  # from before calibration
        "m-FD002-s1": rec("m-FD002-s1", 1, 20.125, 1234.56, 50.0),
        "gone-s0": rec("gone-s0", 0, 1.0, 1.0, 1.0),
    }
    summary = experiments.tables.summarize(plan, results)
    assert [s["group"] for s in summary] == ["m FD001", "m FD002", "m FD003"]
    fd001, fd002, fd003 = summary
    assert fd001["rmse"] == [10.0, 14.0, 12.0]
    assert fd001["rmse_text"] == "12.00 ± 2.00" and fd001["phm08_text"] == "200.0 ± 100.0"
    assert fd001["worst_text"] == "s1 (14.00)" and fd001["train_seconds_text"] == "200"
    assert (fd002["finished"], fd002["planned"], fd002["note"]) == (1, 2, "x")
    assert fd002["rmse_text"] == "20.12" and fd002["phm08_text"] == "1234.6"
    assert fd003["finished"] == 0 and fd003["rmse_text"] == "-"

    pending = {"m-FD003-s0": "python -m x"}
    text = experiments.tables.render_markdown("p", plan, results, pending)
    assert text == experiments.tables.render_markdown("p", plan, results, pending)
    assert "| m FD001 |  | 3/3 | 12.00 ± 2.00 | 200.0 ± 100.0 | s1 (14.00) | 78% | 200 |" in text
    assert "| m FD002 | x | 1/2 | 20.12 | 1234.6 | s1 (20.12) | - | 50 |" in text
    assert "| m FD003 |  | 0/1 | - | - | - | - | - |" in text
    assert (
        "| m-FD001-s1 | m FD001 | done | 14.00 | 7.00 | 300.0 | 0.81 | 1.00 | 10 / 20 | 200 | 205 "
        "| 2025-01-02 03:04:05 | h | 0123456789ab |"
    ) in text
    assert "| m-FD002-s0 | m FD002 | pending | - |" in text
    assert "# m-FD001-s0\npython -m pdm_jax.main --config=c.py --workdir=runs/x\n" in text
    assert "# m-FD003-s0 (pending)\npython -m x\n" in text
    assert "4 of 6 planned rows finished" in text and "(gone-s0)" in text


def test_a_row_past_its_timeout_is_stopped_and_not_recorded(tmp_path):
    argv = [sys.executable, "-c", "import time; print('working', flush=True); time.sleep(120)"]
    start = time.perf_counter()
    report, reason, wall = experiments.run_row(argv, tmp_path / "w", timeout_min=0.02)
    assert report is None and reason.startswith("timed out after 0.02 min")
    assert 1.0 <= wall < 15 and time.perf_counter() - start < 15
    log = (tmp_path / "w" / "run.log").read_text()
    assert "working" in log and "timed out after 0.02 min" in log


def test_recorded_commands_name_no_machine():
    """A results row's command is pasted by others: no venv path, no local data directory."""
    command = (
        "/opt/venv/bin/python -m pdm_jax.main --config=configs/tft.py --workdir=runs/x "
        "--data_dir=/srv/data/cmapss '--config.model.cnn_bilstm.channels=(8, 8)'"
    )
    assert experiments.tables.portable_command(command) == (
        "python -m pdm_jax.main --config=configs/tft.py --workdir=runs/x "
        "--data_dir=$PDM_DATA_DIR '--config.model.cnn_bilstm.channels=(8, 8)'"
    )
    inside = "python -m pdm_jax.main --config=configs/tft.py --data_dir=data/mine"
    assert experiments.tables.portable_command(inside) == inside


def test_every_plan_has_unique_ids_and_existing_configs():
    files = sorted((REPO / "experiments").glob("*.py"))
    plans = [p for p in files if "def get_plan" in p.read_text()]
    assert len(plans) >= 5
    for path in plans:
        plan = experiments.tables.load_plan(path)
        ids = [row["id"] for row in plan]
        assert len(ids) == len(set(ids)), path.name
        assert all((REPO / row["config"]).is_file() for row in plan), path.name


def test_validation_cut_like_the_test_units():
    """Each held-out unit is cut after every test length it outlives, one window per cut."""
    import numpy as np

    from pdm_jax.data.pipeline import Windows, window_ends

    windows_mod = load_module(REPO / "experiments" / "validation_windows.py")
    lives = np.array([40, 60])
    starts = np.concatenate([[0], np.cumsum(lives)[:-1]])
    stops = starts + lives
    row_start = np.repeat(starts, lives)
    observed = np.arange(lives.sum()) - row_start + 1
    val = Windows(
        features=np.zeros((lives.sum(), 1), np.float32),
        targets=(np.repeat(stops, lives) - np.arange(lives.sum()) - 1).astype(np.float32),
        row_start=row_start,
        row_unit=np.repeat([1, 2], lives).astype(np.int32),
        row_dataset=np.zeros(lives.sum(), np.int32),
        row_time=observed.astype(np.float64),
        ends=window_ends(starts, stops, 30, 1, "train"),
        window=30,
    )
    picks = windows_mod.test_cut(val, np.array([35, 50, 55, 70, 20]))
    ends = val.ends[picks]
    # 20 cycles has no full window; 70 outlives both units; 50 and 55 only the second.
    assert observed[ends].tolist() == [35, 35, 50, 55]
    assert val.row_start[ends].tolist() == [0, 40, 40, 40]
    assert val.targets[ends].tolist() == [5, 25, 10, 5]
