"""Command-line errors as one line each: a bad `--config` file, key or value.

ml_collections' config flag reports these as tracebacks (a missing or broken config file fails
lazily, on first use, with a 39-line chain) or as a `KeyError`'s repr with literal escapes.
`main` and the scripts say `error: <what>` and exit 2 instead, like every other bad input.
"""

from __future__ import annotations

import logging as pylogging
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags, logging
from ml_collections import config_flags

from pdm_jax import configuration


def config_path(argv: Sequence[str], name: str = "config") -> str | None:
    """The value of `--config=PATH` or `--config PATH` in argv, if given."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def config_file_error(path: str, flag: str = "--config") -> str | None:
    """Why the config file at `path` cannot give a config, in one line; None when it can.

    Runs the file as `--config` would (ml_collections' `path:argument` form included) so its
    own exception is what the user reads, with the line of the file it came from.
    """
    file, _, argument = path.partition(":")
    if not os.path.isfile(file):
        if os.path.isfile(path):
            file, argument = path, ""
        else:
            return f"{flag}: {file}: no such file"
    try:
        module = configuration.load_module(file)
        getter = getattr(module, "get_config", None)
        if getter is None:
            return f"{flag}: {file}: defines no get_config()"
        getter(argument) if argument else getter()
    except Exception as err:  # the user's file may raise anything: report it, never a traceback
        return f"{flag}: {file}: {_describe(err, file)}"
    return None


def _describe(err: BaseException, file: str) -> str:
    """`SyntaxError: invalid syntax (line 3)`: the exception and where in the user's file."""
    text = err.msg if isinstance(err, SyntaxError) else str(err)
    text = text.splitlines()[0] if text else ""
    line = err.lineno if isinstance(err, SyntaxError) else None
    if line is None:
        frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename == file]
        line = frames[-1].lineno if frames else None
    where = f" (line {line})" if line else ""
    return f"{type(err).__name__}: {text}{where}" if text else f"{type(err).__name__}{where}"


def unknown_key_error(err: BaseException, argv: Sequence[str]) -> str:
    """`--config.train.num_step: no such config key (did you mean train.num_steps?)`.

    ml_collections raises a KeyError/AttributeError whose text is the quoted missing key and,
    when one is close, a 'Did you mean "x" instead of "y"?' line.
    """
    text = str(err.args[0]) if err.args else str(err)
    text = text.replace("\\n", "\n").replace("\\'", "'")
    missing = text.splitlines()[0].strip().strip("\"'") if text.strip() else ""
    suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        flag = arg.split("=", 1)[0]
        parts = flag[len("--config.") :].split(".")
        if missing in parts:
            hint = ""
            if suggestion:
                fixed = [suggestion.group(1) if p == missing else p for p in parts]
                hint = f" (did you mean {'.'.join(fixed)}?)"
            return f"{flag}: no such config key{hint}"
    return f"--config.{missing}: no such config key"


def flag_error(err: Exception) -> str:
    """`--config.KEY: cannot parse VALUE (why)`; the value may hold a line break of its own."""
    text = str(err)
    match = re.match(r"flag --(config\.[\w.]+)=(.*?): (.*)", text, re.DOTALL)
    if match:
        why = match.group(3).strip().splitlines()
        return f"--{match.group(1)}: cannot parse {match.group(2)!r} ({why[0] if why else '?'})"
    return text.splitlines()[0] if text.strip() else type(err).__name__


def exit_with(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)


def parse_flags(
    argv: list[str], parse: Callable[[list[str]], list[str]] | None = None
) -> list[str]:
    """absl's parser (`parse`, default `flags.FLAGS`), with every config error one line, exit 2."""
    path = config_path(argv[1:])
    if path is not None:
        problem = config_file_error(path)
        if problem:
            exit_with(problem)
    try:
        return (parse or flags.FLAGS)(argv)
    except flags.Error as err:
        exit_with(flag_error(err))
    except (AttributeError, KeyError) as err:  # config_flags: a key the config does not have
        exit_with(unknown_key_error(err, argv))
    raise AssertionError("unreachable")


class _LibraryInfoFilter(pylogging.Filter):
    """Orbax logs several INFO lines per save (our own log says what was saved, and where), and
    jax one per accelerator plugin it probes and does not find: on a CPU machine that reads
    `INTERNAL: Failed to open libtpu.so`, which alarms a newcomer for nothing."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        if record.levelno > pylogging.INFO:
            return True
        if "/orbax/" in record.pathname:
            return False
        return not (
            record.pathname.endswith("xla_bridge.py")
            and "Unable to initialize backend" in record.getMessage()
        )


def quiet_library_logs() -> None:
    logging.get_absl_handler().addFilter(_LibraryInfoFilter())


def log_config(flag: Any) -> None:
    """One line for the config: its file and the command line's overrides; `config.json` in the
    workdir holds the whole resolved config, so the log need not print it."""
    overrides = config_flags.get_override_values(flag)
    logging.info(
        "config %s%s (config.json in the workdir holds it whole)",
        config_flags.get_config_filename(flag),
        f" with {configuration.describe(overrides)}" if overrides else "",
    )
