"""Typed user-facing errors, and the command-line parser the scripts report bad flags with.

`main` turns these into one line on stderr and exit code 2 (DESIGN.md invariant 4), so their
message must stand alone: name the file, row, column or config key, and what was expected.
"""

import argparse
import sys
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """A flag mistake reads like every other error of the scripts: one line, exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)


def first_line(exc: BaseException) -> str:
    """A library exception's message cut to its first line (or its type name when empty): what
    fits after "cannot read: ..." in a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class PdmError(Exception):
    """Base for errors caused by the user's input rather than by a bug.

    Its text is one line whatever it quotes: the commands print it after `error: ` as the line a
    user (or a log scraper) reads, so a line break or control code from user input (a column name
    holding a newline, a stray byte in a header) is shown escaped.
    """

    def __str__(self) -> str:
        text = super().__str__()
        if text.isprintable():
            return text
        return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class DataError(PdmError):
    """Bad or missing data: the message names file, column and/or row, and the expectation."""


class ConfigError(PdmError):
    """An invalid configuration: the message names the config key and what was expected."""
