"""Telling "the storage did not answer" from "the data is bad", and asking whether it answers.

Why: storage faults must not stop training. An unreachable store is a warning and a skipped
step; anything else (a bug, a damaged step) is handled as what it is. Both the store and the
Azure backend word their errors through `describe_error`, so no secret reaches a log.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable

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
