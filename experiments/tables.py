"""Experiment plans, the commands their rows run, and the results tables made from them.

A plan is a Python file with `get_plan() -> list[dict]` (see experiments/first_bar.py), one row
per (config, overrides, seed). Why apart from the runner (`scripts/experiments.py`): a table is
regenerated from its plan and results file alone (`--table_only`), and the commands and table
format are what readers of `experiments/results/` rely on; the runner only decides which rows
to run and runs them. Loaded by path, like the plans.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import re
import shlex
import statistics
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pdm_jax.configuration import load_module

REPO = pathlib.Path(__file__).resolve().parents[1]
ROW_KEYS = ("id", "config", "overrides", "group")
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
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


def finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def fmt(value: Any, decimals: int) -> str:
    number = finite(value)
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
        rmse = [v for v in (finite(r.get("test_rmse")) for r in done) if v is not None]
        phm08 = [v for v in (finite(r.get("test_phm08")) for r in done) if v is not None]
        train_s = [v for v in (finite(r.get("train_seconds")) for r in done) if v is not None]
        cover = [v for v in (finite(r.get("test_coverage")) for r in done) if v is not None]
        scored = [r for r in done if finite(r.get("test_rmse")) is not None]
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
                "train_seconds_text": fmt(statistics.fmean(train_s), 0) if train_s else NA,
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
                fmt(record.get("test_rmse"), 2),
                fmt(record.get("test_mae"), 2),
                fmt(record.get("test_phm08"), 1),
                fmt(record.get("test_coverage"), 2),
                fmt(record.get("val_rmse"), 2),
                f"{record.get('best_step', NA)} / {record.get('steps', NA)}",
                fmt(record.get("train_seconds"), 0),
                fmt(record.get("wall_seconds"), 0),
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
