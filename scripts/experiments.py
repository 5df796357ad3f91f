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
import math
import os
import pathlib
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TextIO

from pdm_jax.configuration import load_module

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_PLAN = "experiments/first_bar.py"
ROW_KEYS = ("id", "config", "overrides", "group")
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
LOG_PREFIX = "=== experiments.py"
# How long a timed-out row gets between SIGTERM and SIGKILL.
KILL_GRACE_S = 10.0
NA = "-"  # an empty cell: no result yet, or a value the run did not produce

Row = dict[str, Any]
Record = dict[str, Any]


class PlanError(Exception):
    """A plan or flag the runner cannot work with: one line on stderr, exit code 2."""


# ----------------------------------------------------------------------------- plan and commands


def load_plan(path: str | os.PathLike) -> list[Row]:
    """Checks the plan up front, because a typo found at row 12 would cost hours of runs."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise PlanError(f"{path}: plan file not found")
    module = load_module(path)
    if not callable(getattr(module, "get_plan", None)):
        raise PlanError(f"{path}: no get_plan() function")
    rows = list(module.get_plan())
    seen: set[str] = set()
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise PlanError(f"{path}: row {index} is not a dict")
        missing = [key for key in ROW_KEYS if key not in row]
        if missing:
            raise PlanError(f"{path}: row {index} lacks {', '.join(missing)}")
        row_id = row["id"]
        if not isinstance(row_id, str) or not SAFE_ID.match(row_id):
            raise PlanError(
                f"{path}: row {index}: id {row_id!r} must be letters, digits, '.', '_', '+', '-' "
                "(it names the row's run directory)"
            )
        if row_id in seen:
            raise PlanError(f"{path}: duplicate row id {row_id!r}")
        if not isinstance(row["overrides"], Mapping):
            raise PlanError(f"{path}: row {row_id}: overrides must be a dict")
        seen.add(row_id)
    return [dict(row) for row in rows]


def override_value(value: Any) -> str:
    """Plans hold Python values, the command line holds text: this is the text ml_collections
    parses back into the same value from `--config.key=<text>`."""
    if isinstance(value, str):
        return value
    if isinstance(value, tuple | list):
        return repr(tuple(value))
    return repr(value)


def parse_sets(items: Iterable[str]) -> dict[str, str]:
    overrides: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().removeprefix("--").removeprefix("config.")
        if not sep or not key:
            raise PlanError(f"--set {item!r}: expected key=value, e.g. train.patience=20")
        overrides[key] = value
    return overrides


def display_path(path: pathlib.Path) -> str:
    """Paths inside the repository relative to it, so commands in the table work on any clone."""
    path = path.resolve()
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def resolve_from_repo(path: str) -> pathlib.Path:
    candidate = pathlib.Path(path)
    return candidate if candidate.is_absolute() else REPO / candidate


def effective_overrides(row: Row, extra: Mapping[str, str]) -> dict[str, str]:
    """Row overrides, then --set ones: what the user types on this invocation wins."""
    merged = {key: override_value(value) for key, value in row["overrides"].items()}
    merged.update(extra)
    return merged


def build_argv(
    row: Row,
    workdir: pathlib.Path,
    extra: Mapping[str, str],
    data_dir: str | None,
    python: str = sys.executable,
) -> list[str]:
    argv = [
        python,
        "-m",
        "pdm_jax.main",
        f"--config={display_path(resolve_from_repo(row['config']))}",
        f"--workdir={display_path(workdir)}",
    ]
    if data_dir:
        argv.append(f"--data_dir={display_path(pathlib.Path(data_dir))}")
    argv += [f"--config.{key}={value}" for key, value in effective_overrides(row, extra).items()]
    return argv


def portable_command(command: str) -> str:
    """The recorded command as anyone can rerun it: the interpreter as `python` and a data
    directory outside the repository as `$PDM_DATA_DIR` (absolute paths only work on the machine
    that ran it)."""
    argv = shlex.split(command)
    if not argv:
        return command
    argv = ["python", *argv[1:]]
    argv = ["--data_dir=$PDM_DATA_DIR" if a.startswith("--data_dir=/") else a for a in argv]
    return " ".join(a if a == "--data_dir=$PDM_DATA_DIR" else shlex.quote(a) for a in argv)


# ---------------------------------------------------------------------------------- results file


def read_results(path: pathlib.Path) -> dict[str, Record]:
    """id -> record. The last line of an id wins, so a hand-appended correction needs no edit
    of the old line; a line torn by a crash is skipped rather than blocking the whole table."""
    results: dict[str, Record] = {}
    if not path.is_file():
        return results
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            sys.stderr.write(f"warning: {path}:{number}: not JSON, ignored\n")
            continue
        if isinstance(record, dict) and isinstance(record.get("id"), str):
            results[record["id"]] = record
    return results


def append_result(path: pathlib.Path, record: Record) -> None:
    """One write per line, fsynced; a line torn by an earlier crash is closed off first so it
    cannot swallow this one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=False, allow_nan=False) + "\n"
    with open(path, "a+b") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() > 0:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                line = "\n" + line
        handle.write(line.encode())
        handle.flush()
        os.fsync(handle.fileno())


def write_atomic(path: pathlib.Path, text: str) -> None:
    """Temp file beside the target, then rename: readers never see a half-written table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


# ------------------------------------------------------------------------------------ the table


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _fmt(value: Any, decimals: int) -> str:
    number = _finite(value)
    return NA if number is None else f"{number:.{decimals}f}"


def _mean_std(values: Sequence[float], decimals: int) -> str:
    if not values:
        return NA
    mean = f"{statistics.fmean(values):.{decimals}f}"
    if len(values) < 2:
        return mean
    return f"{mean} ± {statistics.stdev(values):.{decimals}f}"


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _short_commit(commit: Any) -> str:
    if not isinstance(commit, str) or not commit:
        return NA
    return commit[:12] + ("+dirty" if commit.endswith("+dirty") else "")


def _seed_label(record: Record) -> str:
    seed = record.get("seed")
    return f"s{seed}" if seed is not None else str(record.get("id"))


def summarize(plan: Sequence[Row], results: Mapping[str, Record]) -> list[dict[str, Any]]:
    """Per group, in plan order: finished count and mean ± sample std over finished seeds.

    The sample (n - 1) std, because three seeds estimate the spread of a population of seeds.
    """
    groups: dict[str, list[Row]] = {}
    for row in plan:
        groups.setdefault(str(row["group"]), []).append(row)
    summary = []
    for group, rows in groups.items():
        done = [results[row["id"]] for row in rows if row["id"] in results]
        rmse = [v for v in (_finite(r.get("test_rmse")) for r in done) if v is not None]
        phm08 = [v for v in (_finite(r.get("test_phm08")) for r in done) if v is not None]
        train_s = [v for v in (_finite(r.get("train_seconds")) for r in done) if v is not None]
        cover = [v for v in (_finite(r.get("test_coverage")) for r in done) if v is not None]
        scored = [r for r in done if _finite(r.get("test_rmse")) is not None]
        worst = max(scored, key=lambda r: r["test_rmse"]) if scored else None
        summary.append(
            {
                "group": group,
                "note": next((str(r["note"]) for r in rows if r.get("note")), ""),
                "finished": len(done),
                "planned": len(rows),
                "rmse": rmse,
                "phm08": phm08,
                "rmse_text": _mean_std(rmse, 2),
                "phm08_text": _mean_std(phm08, 1),
                "worst": worst,
                "worst_text": (f"{_seed_label(worst)} ({worst['test_rmse']:.2f})" if worst else NA),
                "train_seconds_text": _fmt(statistics.fmean(train_s), 0) if train_s else NA,
                "coverage_text": f"{statistics.fmean(cover):.0%}" if cover else NA,
            }
        )
    return summary


def render_markdown(
    plan_name: str,
    plan: Sequence[Row],
    results: Mapping[str, Record],
    pending_commands: Mapping[str, str] | None = None,
    results_name: str | None = None,
) -> str:
    """The whole table from the plan and the results only (no clock), so a regenerated file
    differs from the old one only where a result changed."""
    pending_commands = pending_commands or {}
    done = sum(1 for row in plan if row["id"] in results)
    source = results_name or f"{plan_name}.jsonl"
    lines = [
        f"# Results: {plan_name}",
        "",
        f"Generated by `scripts/experiments.py` from `{source}`; do not edit (regenerate with "
        "`--table_only`). "
        f"{done} of {len(plan)} planned rows finished; *pending* rows have no result line yet "
        "(never run, failed, or still running).",
        "",
        "## Summary",
        "",
        "Test RMSE and PHM08 score: mean ± sample standard deviation over the finished seeds "
        "(± omitted for a single seed); worst seed = highest test RMSE; p10-p90 coverage: mean "
        "share of test units inside their band (80 % when calibrated).",
        "",
        "| group | note | n | test RMSE | PHM08 score | worst seed (RMSE) | p10-p90 coverage "
        "| mean train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in summarize(plan, results):
        lines.append(
            "| "
            + " | ".join(
                _cell(c)
                for c in (
                    entry["group"],
                    entry["note"],
                    f"{entry['finished']}/{entry['planned']}",
                    entry["rmse_text"],
                    entry["phm08_text"],
                    entry["worst_text"],
                    entry["coverage_text"],
                    entry["train_seconds_text"],
                )
            )
            + " |"
        )
    lines += [
        "",
        "## Runs",
        "",
        "| id | group | status | test RMSE | test MAE | PHM08 | p10-p90 cover | val RMSE "
        "| best step / steps | train s | wall s | finished (UTC) | host | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in plan:
        record = results.get(row["id"])
        if record is None:
            cells = [row["id"], row["group"], "pending", *[NA] * 11]
        else:
            cells = [
                row["id"],
                row["group"],
                "done",
                _fmt(record.get("test_rmse"), 2),
                _fmt(record.get("test_mae"), 2),
                _fmt(record.get("test_phm08"), 1),
                _fmt(record.get("test_coverage"), 2),
                _fmt(record.get("val_rmse"), 2),
                f"{record.get('best_step', NA)} / {record.get('steps', NA)}",
                _fmt(record.get("train_seconds"), 0),
                _fmt(record.get("wall_seconds"), 0),
                str(record.get("finished_at", NA))[:19].replace("T", " "),
                record.get("hostname") or NA,
                _short_commit(record.get("git_commit")),
            ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    extra = sorted(set(results) - {row["id"] for row in plan})
    if extra:
        lines += [
            "",
            f"Not shown: {len(extra)} result line(s) for ids no longer in the plan "
            f"({', '.join(extra)}).",
        ]
    lines += [
        "",
        "## Commands",
        "",
        "Run from the repository root with its virtual environment active. Finished rows show "
        "the command that produced them; pending rows the one the runner will run.",
        "",
        "```bash",
    ]
    for row in plan:
        record = results.get(row["id"])
        if record is not None and record.get("command"):
            command = portable_command(record["command"])
        else:
            command = pending_commands.get(row["id"], "")
        lines += [f"# {row['id']}" + ("" if record else " (pending)"), command]
    lines += ["```", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- running


def host_info() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "hostname": platform.node(),
        "cpu": cpu or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }


def git_commit() -> str | None:
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = proc.stdout.strip()
    return commit if proc.returncode == 0 and commit else None


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
        "test_rmse": _finite(test.get("rmse")),
        "test_mae": _finite(test.get("mae")),
        "test_phm08": _finite(test.get("phm08")),
        "test_count": test.get("count"),
        "test_coverage": _finite(test.get("coverage_p10_p90")),
        "val_rmse": _finite(report.get("val_rmse")),
        "best_step": report.get("best_step"),
        "steps": report.get("steps"),
        "train_seconds": _finite(report.get("train_seconds")),
        "wall_seconds": round(wall, 1),
        "command": portable_command(shlex.join(argv)),
        "config": row["config"],
        "overrides": dict(
            arg.removeprefix("--config.").split("=", 1)
            for arg in argv
            if arg.startswith("--config.")
        ),
        "workdir": display_path(workdir),
        "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **context,
        "git_commit": run_info.get("git_commit") or context.get("git_commit"),
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run an experiment plan resumably (one pdm_jax.main subprocess per row) and "
        "keep its results JSONL and Markdown table current.",
        epilog="Exit codes: 0 all selected rows done (or skipped), 1 some row failed, 2 bad plan "
        "or flags, 130 interrupted. A row is done when its id has a line in --results.",
    )
    parser.add_argument(
        "--plan",
        default=DEFAULT_PLAN,
        help="plan file defining get_plan() -> list of rows (default: %(default)s)",
    )
    parser.add_argument(
        "--runs_dir",
        default=None,
        help="parent of the per-row workdirs <runs_dir>/<row id> (default: runs/<plan name>)",
    )
    parser.add_argument(
        "--results",
        default=None,
        help="results JSONL, one line per finished row; the Markdown table is written next to "
        "it with the suffix .md (default: experiments/results/<plan name>.jsonl)",
    )
    parser.add_argument(
        "--only",
        default=None,
        metavar="REGEX",
        help="run only rows whose id matches this regex (re.search, so a substring works)",
    )
    parser.add_argument(
        "--max_rows",
        type=int,
        default=None,
        metavar="N",
        help="run at most N rows this time (skipped rows don't count); the rest stay pending",
    )
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override for every row, passed as --config.KEY=VALUE and winning "
        "over the plan's; repeatable. Finished rows are not rerun when it changes",
    )
    parser.add_argument(
        "--data_dir",
        default=None,
        help="passed to pdm_jax.main --data_dir (directory with the C-MAPSS text files)",
    )
    parser.add_argument(
        "--timeout_min",
        type=float,
        default=None,
        metavar="M",
        help="stop a row after M minutes and count it as failed (default: no limit)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--dry_run",
        action="store_true",
        help="print the command of every row that would run; run and write nothing",
    )
    mode.add_argument(
        "--table_only",
        action="store_true",
        help="only regenerate the Markdown table from the results JSONL",
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
    plan = load_plan(plan_path)
    runs_dir = pathlib.Path(args.runs_dir or REPO / "runs" / plan_name).resolve()
    results_path = pathlib.Path(
        args.results or REPO / "experiments" / "results" / f"{plan_name}.jsonl"
    ).resolve()
    table_path = results_path.with_suffix(".md")
    extra = parse_sets(args.sets)
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
        return build_argv(row, runs_dir / row["id"], extra, data_dir)

    def write_table() -> None:
        pending = {row["id"]: portable_command(shlex.join(argv_for(row))) for row in plan}
        text = render_markdown(
            plan_name, plan, read_results(results_path), pending, results_path.name
        )
        write_atomic(table_path, text)

    if args.table_only:
        write_table()
        print(f"table: {display_path(table_path)}")
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
        if row["id"] in read_results(results_path):
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
        if context is None:
            context = {**host_info(), "git_commit": git_commit(), "plan": plan_name}
        ran += 1
        workdir = runs_dir / row["id"]
        print(f"{prefix} ...", end=" ", file=out, flush=True)
        report, reason, wall = run_row(argv, workdir, args.timeout_min)
        if report is None:
            failed.append(row["id"])
            log = display_path(workdir / "run.log")
            print(f"FAILED after {wall:.0f} s ({reason}); log: {log}", file=out, flush=True)
            continue
        record = make_record(row, report, argv, workdir, wall, context)
        append_result(results_path, record)
        write_table()
        print(
            f"done in {wall:.0f} s: test RMSE {_fmt(record['test_rmse'], 2)}", file=out, flush=True
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
        + f"; results: {display_path(results_path)}; table: "
        + display_path(results_path.with_suffix(".md")),
        file=out,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
