"""The prepared accelerator check: one run on a GPU machine or TPU VM that says whether pdm-jax
works there and how fast, within a fixed time budget. Called by scripts/accelerator_check.sh,
which first makes the packages the machine lacks importable from wheels carried in `.whl/`.

Steps, each a subprocess bounded by what is left of `--budget_s`:
  1. platform: the detection block `pdm_jax.main` logs (backend, device kind, layout decisions);
  2. speed: scripts/benchmark.py for each model in float32 and bfloat16 (train + infer), at the
     PyTorch peers' shapes (14 sensor inputs, window 30, batch 256) and at the committed
     configs' (the main jobs' inputs), with the layout `main` would choose there; and the TFT at
     NVIDIA's reference shapes (hidden 128, 4 heads, 192-step windows, synthetic data), beside
     NVIDIA's published 13.7k items/s on one A100 with AMP;
  3. resume: a short FD001 training with checkpoints every few steps, SIGKILLed once its first
     checkpoint is complete, then the same command again, which must resume from it and finish;
  4. a summary table on stdout, also written to OUT/summary.md with every record in
     OUT/results.jsonl.
A step that fails or runs out of time is a row marked so; the others still run. `--quick` shrinks
every step (tiny models, a few steps) for the test suite on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "bfloat16")
# Benchmark shapes: config overrides per model, and which models they apply to.
SHAPES: dict[str, dict[str, list[str]]] = {
    "peers": {
        "cnn_bilstm": ["data.use_time=False"],
        "tft": ["data.baseline_cycles=0", "data.use_time=False"],
    },
    "config": {"cnn_bilstm": [], "tft": []},
    # NVIDIA's TFT reference (DeepLearningExamples, electricity: 168 + 24 steps).
    "nvidia": {"tft": ["model.tft.hidden=128", "model.tft.heads=4"]},
}
NVIDIA_WINDOW = 192
NVIDIA_UNITS = 200  # synthetic units, enough windows of 192 steps for the timed steps
TINY = {
    "cnn_bilstm": [
        "model.cnn_bilstm.channels=(8,)",
        "model.cnn_bilstm.dilations=(1,)",
        "model.cnn_bilstm.lstm_hidden=8",
        "model.cnn_bilstm.dense=8",
    ],
    "tft": ["model.tft.hidden=8", "model.tft.heads=2", "model.tft.var_hidden=4"],
}


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())


def _run(cmd: list[str], budget: Budget, log: Path) -> tuple[int | None, str]:
    """(exit code or None on timeout, stdout); stderr goes to `log`."""
    if budget.left() < 5:
        return None, ""
    with log.open("a") as err:
        err.write(f"$ {' '.join(cmd)}\n")
        err.flush()
        try:
            proc = subprocess.run(
                cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True, timeout=budget.left()
            )
        except subprocess.TimeoutExpired as timeout:
            out = timeout.stdout or ""
            return None, out if isinstance(out, str) else out.decode(errors="replace")
    return proc.returncode, proc.stdout


def platform_block() -> str:
    """What `pdm_jax.main` logs at start-up about the machine and the layout it chose."""
    from pdm_jax import configuration, hardware

    detected = hardware.detect(hardware.gather())
    layout = hardware.decide(detected, configuration.load_config("tft"))
    return hardware.describe(detected, layout)


def benchmark_command(args: argparse.Namespace, model: str, dtype: str, shape: str) -> list[str]:
    """The scripts/benchmark.py call of one speed row."""
    cmd = [
        sys.executable,
        "scripts/benchmark.py",
        f"--model={model}",
        f"--dtype={dtype}",
        f"--batch={args.batch}",
        f"--steps={args.steps}",
        f"--warmup={2 if args.quick else 5}",
        "--what=train,infer",
        *(f"--set={s}" for s in SHAPES[shape][model]),
    ]
    if shape == "nvidia":
        cmd += [f"--window={NVIDIA_WINDOW}", f"--synthetic_units={NVIDIA_UNITS}"]
    if args.quick:
        cmd += ["--infer_batch=64", *(f"--set={s}" for s in TINY[model])]
    return cmd


def speed(args: argparse.Namespace, budget: Budget, out: Path) -> list[dict[str, Any]]:
    rows = []
    for shape in args.shapes.split(","):
        for model in args.models.split(","):
            if model not in SHAPES[shape]:
                continue
            for dtype in args.dtypes.split(","):
                cmd = benchmark_command(args, model, dtype, shape)
                code, stdout = _run(cmd, budget, out / "benchmark.log")
                records = [json.loads(ln) for ln in stdout.splitlines() if ln.startswith("{")]
                row = {"step": "speed", "model": model, "dtype": dtype, "shape": shape}
                row.update(_speed_figures(records))
                row["status"] = _status(code, "train_samples_per_s" in row)
                rows.append(row)
    return rows


def _speed_figures(records: list[dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for record in records:
        if record.get("what") == "train":
            row.update(
                train_samples_per_s=record["train_samples_per_s"],
                compile_s=record["compile_s"],
                peak_bytes=record.get("peak_bytes"),
                device_kind=record["device_kind"],
                device_count=record["device_count"],
                inputs=record.get("features"),
                window=record.get("window"),
            )
        elif record.get("what") == "infer":
            row["infer_windows_per_s"] = record["infer_windows_per_s"]
    return row


def _status(code: int | None, ok: bool) -> str:
    if code is None:
        return "timed out"
    return "ok" if code == 0 and ok else f"failed (exit {code})"


def _complete_steps(store: Path) -> list[int]:
    if not store.is_dir():
        return []
    return sorted(int(p.name) for p in store.iterdir() if p.name.isdigit())


def resume(args: argparse.Namespace, budget: Budget, out: Path) -> dict[str, Any]:
    """Train, SIGKILL after the first complete checkpoint, rerun: it must resume and finish."""
    workdir = out / "resume_run"
    steps = 12 if args.quick else 300
    every = 4 if args.quick else 50
    cmd = [
        sys.executable,
        "-m",
        "pdm_jax.main",
        "--config=configs/cnn_bilstm.py",
        f"--workdir={workdir}",
        f"--config.train.num_steps={steps}",
        f"--config.train.eval_every={every}",
        f"--config.checkpoint.every_steps={every}",
        "--config.train.plots=False",
    ]
    if args.quick:
        cmd += [f"--config.{s}" for s in TINY["cnn_bilstm"]] + ["--config.train.batch_size=32"]
    row: dict[str, Any] = {"step": "resume", "model": "cnn_bilstm", "steps": steps}
    log = out / "resume.log"
    killed_at = None
    with log.open("a") as err:
        err.write(f"$ {' '.join(cmd)}\n")
        err.flush()
        first = subprocess.Popen(cmd, cwd=REPO, stdout=err, stderr=err)
        while first.poll() is None and budget.left() > 5:
            done = _complete_steps(workdir / "checkpoints")
            if done:
                first.send_signal(signal.SIGKILL)
                killed_at = done[-1]
                break
            time.sleep(0.2)
        if first.poll() is None:
            first.kill()
        first.wait()
    row["killed_after_step"] = killed_at
    if killed_at is None:
        row["status"] = "failed (no checkpoint before the kill)"
        return row
    code, _ = _run(cmd, budget, log)
    report_path = workdir / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    row.update(
        resumed_from_step=report.get("resumed_from_step"),
        final_step=report.get("steps"),
        test_rmse=(report.get("test") or {}).get("rmse"),
    )
    resumed = bool(report.get("resumed_from_step")) and report.get("steps") == steps
    row["status"] = _status(code, resumed)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| step | model | shape | dtype | train samples/s | infer windows/s | compile s | "
        "peak device MiB | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["step"] == "speed":
            peak = r.get("peak_bytes")
            lines.append(
                f"| speed | {r['model']} | {r['shape']} | {r['dtype']} | "
                f"{r.get('train_samples_per_s', '-')} | "
                f"{r.get('infer_windows_per_s', '-')} | {r.get('compile_s', '-')} | "
                f"{'-' if peak is None else round(peak / 2**20)} | {r['status']} |"
            )
        else:
            lines.append(
                f"| resume | {r['model']} | - | - | "
                f"killed after step {r.get('killed_after_step')}, "
                f"resumed from {r.get('resumed_from_step')}, finished at {r.get('final_step')} "
                f"(test RMSE {r.get('test_rmse')}) | | | | {r['status']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="accelerator_check_out", help="directory for the logs")
    parser.add_argument("--budget_s", type=float, default=480.0, help="for all steps together")
    parser.add_argument("--batch", type=int, default=256, help="global batch of the benchmark")
    parser.add_argument("--steps", type=int, default=100, help="timed benchmark steps")
    parser.add_argument("--models", default=",".join(TINY), help="benchmarked models")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="benchmarked dtypes")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="benchmark shapes")
    parser.add_argument("--quick", action="store_true", help="tiny settings (tests, on CPU)")
    args = parser.parse_args(argv)
    from pdm_jax.models import MODEL_NAMES

    unknown = set(args.models.split(",")) - set(MODEL_NAMES)
    unknown |= set(args.dtypes.split(",")) - set(DTYPES)
    unknown |= set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        parser.error(f"unknown model, dtype or shape: {', '.join(sorted(unknown))}")
    if args.quick:
        args.batch, args.steps = 32, 3
    budget = Budget(args.budget_s)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    block = platform_block()
    print(block, flush=True)
    rows = speed(args, budget, out)
    rows.append(resume(args, budget, out))
    summary = table(rows)
    print(summary, flush=True)
    (out / "summary.md").write_text(f"```\n{block}\n```\n\n{summary}\n")
    with (out / "results.jsonl").open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    # The repository itself, uninstalled, for this process and the ones it starts.
    sys.path.insert(0, str(REPO))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
    )
    sys.exit(main())
