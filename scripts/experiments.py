#!/usr/bin/env python
"""Runs an experiment plan row by row, resumably, and keeps its Markdown results table current.

    python scripts/experiments.py [--plan=experiments/first_bar.py] [--only=REGEX] [--max_rows=N]
        [--set key=value ...] [--data_dir=DIR] [--timeout_min=M] [--dry_run | --table_only]

A plan is a Python file with `get_plan() -> list[dict]` (see experiments/first_bar.py). Full
runs take minutes to tens of minutes on a laptop CPU, so a table is filled over several
runs of this command: every finished row appends one JSON line to the results file at once, and
a row whose id already has a line there is skipped, so an interrupted or failed invocation loses
at most the row in progress. Each row is the main job, `python -m pdm_jax.main`, run as a
subprocess exactly as a user would run it (its output goes to <workdir>/run.log), so the table
only ever holds numbers that the printed command reproduces.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from pdm_jax.configuration import load_module

REPO = pathlib.Path(__file__).resolve().parents[1]
# Plans, their commands, the results file and its Markdown table.
tables = load_module(REPO / "experiments" / "tables.py")
PlanError, Row, Record = tables.PlanError, tables.Row, tables.Record
DEFAULT_PLAN = "experiments/first_bar.py"
LOG_PREFIX = "=== experiments.py"
# How long a timed-out row gets between SIGTERM and SIGKILL.
KILL_GRACE_S = 10.0


# ------------------------------------------------------------------------------------- running


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Ends the row's process group (the job and anything it spawned), politely first."""
    for sig, wait_s in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _last_line(log_path: pathlib.Path, offset: int) -> str:
    with open(log_path, "rb") as handle:
        handle.seek(offset)
        tail = handle.read().decode(errors="replace")
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip() and LOG_PREFIX not in ln]
    error_lines = [ln for ln in lines if ln.startswith("error:")]
    return (error_lines or lines or [""])[-1]


def run_row(
    argv: list[str], workdir: pathlib.Path, timeout_min: float | None
) -> tuple[Record | None, str, float]:
    """(report, '' or why it failed, wall seconds). The log is appended to, one framed section
    per attempt, so a failure's output survives the retry that succeeds; its own process group, so a
    timeout can stop the job and anything it spawned without touching the runner."""
    workdir.mkdir(parents=True, exist_ok=True)
    report_path = workdir / "report.json"
    # A report from an earlier attempt must not pass for this one's.
    report_path.unlink(missing_ok=True)
    log_path = workdir / "run.log"
    command = shlex.join(argv)
    with open(log_path, "ab") as log:
        offset = log.tell()
        stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        log.write(f"{LOG_PREFIX} {stamp} start: {command}\n".encode())
        log.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
            start_new_session=True,
        )
        reason = ""
        try:
            proc.wait(timeout=timeout_min * 60 if timeout_min else None)
        except subprocess.TimeoutExpired:
            _stop(proc)
            reason = f"timed out after {timeout_min:g} min"
        except BaseException:
            _stop(proc)
            log.write(f"{LOG_PREFIX} interrupted\n".encode())
            raise
        wall = time.perf_counter() - start
        if not reason and proc.returncode != 0:
            reason = f"exit code {proc.returncode}"
        report = None
        if not reason:
            try:
                report = json.loads(report_path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                reason = f"no readable report.json ({err.__class__.__name__})"
            else:
                if not isinstance(report.get("test"), dict):
                    reason = "report.json has no test scores"
                    report = None
        outcome = reason or "done"
        log.write(f"{LOG_PREFIX} {outcome} after {wall:.1f} s\n".encode())
    if reason:
        detail = _last_line(log_path, offset)
        reason = f"{reason}: {detail}" if detail else reason
    return report, reason, wall


def make_record(
    row: Row,
    report: Record,
    argv: list[str],
    workdir: pathlib.Path,
    wall: float,
    context: Mapping[str, Any],
) -> Record:
    config = _read_json(workdir / "config.json")
    # Written by newer versions of the main job; its commit carries a "+dirty" mark.
    run_info = _read_json(workdir / "run_info.json")
    data = config.get("data", {})
    source = data.get("source", "cmapss")
    test = report.get("test", {})
    return {
        "id": row["id"],
        "group": row["group"],
        "model": config.get("model", {}).get("name") or report.get("model") or row.get("model"),
        "subset": data.get("subset") if source == "cmapss" else row.get("subset"),
        "data_source": source,
        "seed": config.get("seed", row.get("seed")),
        "test_rmse": tables.finite(test.get("rmse")),
        "test_mae": tables.finite(test.get("mae")),
        "test_phm08": tables.finite(test.get("phm08")),
        "test_count": test.get("count"),
        "test_coverage": tables.finite(test.get("coverage_p10_p90")),
        "val_rmse": tables.finite(report.get("val_rmse")),
        "best_step": report.get("best_step"),
        "steps": report.get("steps"),
        "train_seconds": tables.finite(report.get("train_seconds")),
        "wall_seconds": round(wall, 1),
        "command": tables.portable_command(shlex.join(argv)),
        "config": row["config"],
        "overrides": dict(
            arg.removeprefix("--config.").split("=", 1)
            for arg in argv
            if arg.startswith("--config.")
        ),
        "workdir": tables.display_path(workdir),
        "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **context,
        "git_commit": run_info.get("git_commit"),
        "jax_version": (run_info.get("packages") or {}).get("jax"),
        "params_sha256": report.get("params_sha256"),
    }


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return payload if isinstance(payload, dict) else {}


@contextlib.contextmanager
def runner_lock(runs_dir: pathlib.Path) -> Any:
    """Two runners on one plan would train the same rows twice and race on the workdirs."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    with open(runs_dir / ".runner.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PlanError(f"another experiments.py is running on {runs_dir}") from None
        yield


# ------------------------------------------------------------------------------------------ CLI


# (flag, argparse options, help): the flags of every version of this script, unchanged.
FLAGS: tuple[tuple[str, dict[str, Any], str], ...] = (
    (
        "--plan",
        {"default": DEFAULT_PLAN},
        "plan file defining get_plan() -> list of rows (default: %(default)s)",
    ),
    (
        "--runs_dir",
        {},
        "parent of the per-row workdirs <runs_dir>/<row id> (default: runs/<plan name>)",
    ),
    (
        "--results",
        {},
        "results JSONL, one line per finished row; the Markdown table is written "
        "next to it with the suffix .md (default: experiments/results/<plan name>.jsonl)",
    ),
    (
        "--only",
        {"metavar": "REGEX"},
        "run only rows whose id matches this regex (re.search, so a substring works)",
    ),
    (
        "--max_rows",
        {"type": int, "metavar": "N"},
        "run at most N rows this time (skipped rows don't count); the rest stay pending",
    ),
    (
        "--set",
        {"dest": "sets", "action": "append", "default": [], "metavar": "KEY=VALUE"},
        "extra config override for every row, passed as --config.KEY=VALUE and winning over the "
        "plan's; repeatable. Finished rows are not rerun when it changes",
    ),
    ("--data_dir", {}, "passed to pdm_jax.main --data_dir (directory with the C-MAPSS files)"),
    (
        "--timeout_min",
        {"type": float, "metavar": "M"},
        "stop a row after M minutes and count it as failed (default: no limit)",
    ),
    (
        "--dry_run",
        {"action": "store_true"},
        "print the command of every row that would run; run and write nothing",
    ),
    (
        "--table_only",
        {"action": "store_true"},
        "only regenerate the Markdown table from the results JSONL",
    ),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run an experiment plan resumably (one pdm_jax.main subprocess per row) and "
        "keep its results JSONL and Markdown table current.",
        epilog="Exit codes: 0 all selected rows done (or skipped), 1 some row failed, 2 bad plan "
        "or flags, 130 interrupted. A row is done when its id has a line in --results.",
    )
    mode = parser.add_mutually_exclusive_group()
    for flag, options, text in FLAGS:
        (mode if flag in ("--dry_run", "--table_only") else parser).add_argument(
            flag, help=text, **options
        )
    return parser.parse_args(argv)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The row's job runs in its own process group, so a plain SIGTERM to the runner would orphan it
    # (training on, its result never recorded): stop it the way Ctrl-C does.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main(args)
    except PlanError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; finished rows are recorded, rerun to resume\n")
        return 130


def _main(args: argparse.Namespace) -> int:
    plan_path = pathlib.Path(args.plan)
    if not plan_path.is_absolute() and not plan_path.exists():
        plan_path = REPO / plan_path
    plan_name = plan_path.stem
    plan = tables.load_plan(plan_path)
    runs_dir = pathlib.Path(args.runs_dir or REPO / "runs" / plan_name).resolve()
    results_path = pathlib.Path(
        args.results or REPO / "experiments" / "results" / f"{plan_name}.jsonl"
    ).resolve()
    table_path = results_path.with_suffix(".md")
    extra = tables.parse_sets(args.sets)
    data_dir = str(pathlib.Path(args.data_dir).resolve()) if args.data_dir else None
    if args.max_rows is not None and args.max_rows < 0:
        raise PlanError("--max_rows: expected an integer >= 0")
    if args.timeout_min is not None and args.timeout_min <= 0:
        raise PlanError("--timeout_min: expected minutes > 0")
    try:
        only = re.compile(args.only) if args.only else None
    except re.error as err:
        raise PlanError(f"--only {args.only!r}: not a regex ({err})") from None

    def argv_for(row: Row) -> list[str]:
        return tables.build_argv(row, runs_dir / row["id"], extra, data_dir)

    def write_table() -> None:
        pending = {row["id"]: tables.portable_command(shlex.join(argv_for(row))) for row in plan}
        text = tables.render_markdown(
            plan_name, plan, tables.read_results(results_path), pending, results_path.name
        )
        tables.write_atomic(table_path, text)

    if args.table_only:
        write_table()
        print(f"table: {tables.display_path(table_path)}")
        return 0

    selected = [row for row in plan if only is None or only.search(row["id"])]
    if not selected:
        raise PlanError(f"--only {args.only!r} matches no row id of {plan_path.name}")
    lock = contextlib.nullcontext() if args.dry_run else runner_lock(runs_dir)
    with lock:
        return _run_rows(args, plan_name, selected, runs_dir, results_path, argv_for, write_table)


def _run_rows(
    args: argparse.Namespace,
    plan_name: str,
    selected: list[Row],
    runs_dir: pathlib.Path,
    results_path: pathlib.Path,
    argv_for: Callable[[Row], list[str]],
    write_table: Callable[[], None],
) -> int:
    out: TextIO = sys.stdout
    total = len(selected)
    ran, skipped, left, failed = 0, 0, 0, []
    context: dict[str, Any] | None = None
    for index, row in enumerate(selected, 1):
        prefix = f"[{index}/{total}] {row['id']}"
        # Re-read every row: another invocation may have finished rows meanwhile.
        if row["id"] in tables.read_results(results_path):
            skipped += 1
            print(f"{prefix} ... skipped (already recorded)", file=out, flush=True)
            continue
        if args.max_rows is not None and ran >= args.max_rows:
            left += 1
            continue
        argv = argv_for(row)
        if args.dry_run:
            ran += 1
            print(f"{prefix} ... would run:\n  {shlex.join(argv)}", file=out, flush=True)
            continue
        if context is None:  # the row's run_info.json has its commit, packages and platform
            context = {"hostname": platform.node(), "cpu_count": os.cpu_count(), "plan": plan_name}
        ran += 1
        workdir = runs_dir / row["id"]
        print(f"{prefix} ...", end=" ", file=out, flush=True)
        report, reason, wall = run_row(argv, workdir, args.timeout_min)
        if report is None:
            failed.append(row["id"])
            log = tables.display_path(workdir / "run.log")
            print(f"FAILED after {wall:.0f} s ({reason}); log: {log}", file=out, flush=True)
            continue
        record = make_record(row, report, argv, workdir, wall, context)
        tables.append_result(results_path, record)
        write_table()
        print(
            f"done in {wall:.0f} s: test RMSE {tables.fmt(record['test_rmse'], 2)}",
            file=out,
            flush=True,
        )
    if args.dry_run:
        print(
            f"dry run: {ran} row(s) would run, {skipped} already recorded"
            + (f", {left} beyond --max_rows" if left else ""),
            file=out,
        )
        return 0
    write_table()
    print(
        f"{ran - len(failed)} done, {skipped} skipped, {len(failed)} failed"
        + (f" ({', '.join(failed)})" if failed else "")
        + (f", {left} left for later (--max_rows)" if left else "")
        + f"; results: {tables.display_path(results_path)}; table: "
        + tables.display_path(results_path.with_suffix(".md")),
        file=out,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
