"""`run_info.json`: what produced a run, so a number in a report can be traced and reproduced.

Package versions, the git commit of the code (when it is a checkout), the platform and layout
decisions, the data fingerprint and the command line. No environment variables: they may hold
credentials.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from typing import Any

PACKAGES = (
    "pdm-jax",
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "grain",
    "tensorstore",
    "ml-collections",
    "numpy",
    "pandas",
)


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_commit(path: str | None = None) -> str | None:
    """The commit of the checkout holding this package, '+dirty' when it has local changes."""
    path = path or os.path.dirname(os.path.abspath(__file__))
    try:
        run = dict(cwd=path, capture_output=True, text=True, timeout=5, check=True)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run)
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty.stdout.strip() else "") if commit else None


def command_line(argv: list[str] | None = None) -> str:
    """The command as the user typed it, to paste back into a shell.

    `sys.argv` holds `.../pdm_jax/main.py` for `python -m pdm_jax.main`; the interpreter's own
    argv (`sys.orig_argv`) keeps the `-m`. The interpreter's path becomes `python` (the one on
    PATH in the run's environment), and a console script its name alone.
    """
    argv = list(sys.orig_argv if argv is None else argv)
    if argv and os.path.basename(argv[0]).startswith("python"):
        argv[0] = "python"
        if len(argv) > 1 and not argv[1].startswith("-") and os.path.basename(argv[1]) == "pdm-jax":
            argv = argv[1:]
    if argv and os.path.basename(argv[0]) == "pdm-jax":
        argv[0] = "pdm-jax"
    return shlex.join(argv)


def collect(platform_and_layout: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """`platform_and_layout` is `hardware.to_dict`'s {'platform': ..., 'layout': ...}."""
    return {
        "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command_line(),
        "python": sys.version.split()[0],
        "os": platform.platform(),
        "packages": versions(),
        "git_commit": git_commit(),
        **platform_and_layout,
        "data": data,
    }
