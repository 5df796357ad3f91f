"""Telling "the storage did not answer" from "the data is bad", and asking whether it answers.

Why: storage faults must not stop training. An unreachable store is a warning and a skipped
step; anything else (a bug, a damaged step) is handled as what it is. Both the store and the
Azure backend word their errors through `describe_error`, so no secret reaches a log.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import shutil
import threading
from collections.abc import Callable

from pdm_jax.errors import PdmError

# How long save() waits for gs:// or s3:// to answer a listing before it skips its step. The
# clients' own retries take ~10 s (s3fs) to ~30 s (gcsfs) to give up on a stopped server.
PROBE_S = 10.0
MAX_PROBES = 3
# Exception types (by name, so no cloud SDK is imported to check) and TensorStore status texts
# that mean "could not reach the storage" rather than "the data is bad".
_UNREACHABLE_TYPES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "ServiceRequestError",
        "ServiceResponseError",
        "ClientConnectorError",
        "ServerDisconnectedError",
        "ServerTimeoutError",
    }
)
_UNREACHABLE_TEXT = ("UNAVAILABLE:", "DEADLINE_EXCEEDED:", "retry attempts failed", "CURL error")
# What a full disk or an exhausted quota says, through OSError or TensorStore's status text.
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_FULL_TEXT = ("No space left on device", "Disk quota exceeded")
_SECRET = re.compile(
    r"(?i)\b([\w-]*(?:sig|signature|key|token|secret|password|credential))=([^&;\s'\"]+)"
)


def describe_error(err: BaseException) -> str:
    """One line for a log or error message: type, first line, no spec dumps, no secrets."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else ""
    text = text.split(" [tensorstore_spec=", 1)[0]
    text = _SECRET.sub(r"\1=***", text)
    if len(text) > 400:
        text = text[:397] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def is_unreachable(err: BaseException) -> bool:
    """Whether `err` (or what caused it) says the storage could not be reached."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionError | TimeoutError):
            return True
        if type(current).__name__ in _UNREACHABLE_TYPES:
            return True
        if any(marker in str(current) for marker in _UNREACHABLE_TEXT):
            return True
        current = current.__cause__ or current.__context__
    return False


def full_reason(err: BaseException) -> str | None:
    """ "No space left on device" (or the quota's text) if `err` or its cause says so."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FULL_ERRNOS:
            return os.strerror(current.errno)
        for text in _FULL_TEXT:
            if text in str(current):
                return text
        current = current.__cause__ or current.__context__
    return None


class Prober:
    """Bounded checks that a store answers, each in a helper thread so the caller never waits
    longer than `probe_s` for a server that does not answer."""

    def __init__(
        self, uri: str, scheme: str, ping: Callable[[], None] | None, probe_s: float
    ) -> None:
        """`ping`: one cheap request to the store (default: a listing of its root)."""
        self.uri = uri
        self.scheme = scheme
        self.probe_s = float(probe_s)
        self._ping = ping or self._list_root
        self._probers: list[threading.Thread] = []

    def unreachable_reason(self) -> str | None:
        """None if the storage answered a request within `probe_s`, else why not."""
        if self.scheme == "file":
            return None
        # Checks that got no answer go on in the background until the client gives up; a new
        # one starts anyway (the storage may be back), up to a few at a time.
        self._probers = [t for t in self._probers if t.is_alive()]
        if len(self._probers) >= MAX_PROBES:
            return f"{len(self._probers)} earlier checks are still waiting for an answer"
        outcome: list[BaseException] = []
        ping = self._ping

        def check() -> None:
            try:
                ping()
            except Exception as err:
                outcome.append(err)

        prober = threading.Thread(target=check, name="pdm-checkpoint-probe", daemon=True)
        prober.start()
        prober.join(self.probe_s)
        if prober.is_alive():
            self._probers.append(prober)
            return f"no answer in {self.probe_s:.0f} s"
        # Any other error (say, permission denied) is an answer: the save reports it itself.
        if outcome and is_unreachable(outcome[0]):
            return describe_error(outcome[0])
        return None

    def _list_root(self) -> None:
        """A listing that really goes to the server: fsspec clients answer `exists` from their
        listings cache, which would call a stopped server reachable."""
        import fsspec  # with s3fs/gcsfs, which require_packages has checked

        fs, root = fsspec.core.url_to_fs(self.uri)
        with contextlib.suppress(FileNotFoundError):  # nothing saved yet is still an answer
            fs.ls(root, refresh=True)


# Saves in a row that may fail for lack of space before the run ends: a full disk seldom frees
# itself, and every further step trained would be lost again.
FULL_TRIES = 3


class StorageFullError(PdmError):
    """The checkpoint storage has no room left for a step."""


class FullStorage:
    """Saves that failed for lack of space, in a row: `check` ends the run once there are
    FULL_TRIES of them (or one, for the run's last save)."""

    def __init__(self, uri: str, scheme: str) -> None:
        self.uri, self.scheme = uri, scheme
        self.failed: list[tuple[int, str]] = []  # (step, reason)

    def note(self, step: int, err: BaseException) -> None:
        """Counts a save that failed for lack of space and removes what it wrote (locally), so
        the next try has the room the failed one took."""
        reason = full_reason(err)
        if reason is None:
            return
        self.failed.append((step, reason))
        self._remove_partial(step)

    def _remove_partial(self, step: int) -> None:
        if self.scheme == "file":
            for partial in glob.glob(os.path.join(glob.escape(self.uri), f"{step}.orbax-*")):
                shutil.rmtree(partial, ignore_errors=True)

    def clear(self) -> None:
        self.failed = []

    def check(self, latest: int | None, final: bool = False) -> None:
        """StorageFullError, once, naming the failed steps and the step a rerun resumes from."""
        if len(self.failed) < (1 if final else FULL_TRIES):
            return
        steps = ", ".join(str(step) for step, _ in self.failed)
        reason = self.failed[-1][1]
        for step, _ in self.failed:  # again: writer threads may have outlived the first sweep
            self._remove_partial(step)
        self.failed = []
        raise StorageFullError(
            f"checkpoint storage {self.uri} is full ({reason}): saving step(s) {steps} failed; "
            f"the latest complete step is {latest}. Free space or set checkpoint.uri elsewhere, "
            "then rerun to resume from it"
        )
