"""One owner per run: an owner record in the workdir and in the checkpoint store.

Why: the same command started twice (two terminals, a scheduler restarting a job it thinks
died, a second VM resuming from the same `s3://` prefix) would otherwise write both runs' steps
into one store and one `metrics.jsonl`, and a writer's start-up cleans unfinished step
directories, which deletes a live run's save in progress. So a run claims both places before it
writes anything, refreshes a heartbeat while it lives, and removes the record when it ends.

A record names its host, process id (with the process's start time, so a reused pid is not
mistaken for the owner), start time and last heartbeat. A record left by a dead process of this
host is taken over at once (rerunning a killed command resumes as before); one from another
host is taken over once its heartbeat is older than the timeout; `take_over` takes over at once.

Creating the record is atomic where the store allows it: a hard link locally, `If-None-Match`
on S3, `ifGenerationMatch=0` on GCS, `overwrite=False` on Azure. Where a store ignores the
condition (emulators, some S3 clones), the read before the write still refuses any run that
starts after the owner, and two that start within the same moment are told apart by the
heartbeat that follows. A take-over (replacing a stale
record) is a plain write read back: two runs taking over the same stale record at the same
moment are told apart only by the heartbeat that follows, when the loser finds another token
and stops.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from pdm_jax.checkpoint.faults import describe_error
from pdm_jax.checkpoint.uri import scheme_of
from pdm_jax.errors import PdmError

log = logging.getLogger(__package__)

RECORD = "pdm-owner.json"
# Heartbeats come at most this far apart, and at least four per timeout.
HEARTBEAT_MAX_S = 30.0


class InUseError(PdmError):
    """Another live run owns the place this run would write to."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> str:
    """The process's start time since boot (Linux), so a reused pid reads as another process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(pid: int, ticks: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return not ticks or not _start_ticks(pid) or _start_ticks(pid) == ticks


def _stamp(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Local:
    def __init__(self, directory: str):
        self.path = os.path.join(directory, RECORD)
        self.directory = directory

    def read(self) -> bytes | None:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def _staged(self, data: bytes) -> str:
        os.makedirs(self.directory, exist_ok=True)
        tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        return tmp

    def create(self, data: bytes) -> None:
        """A complete record or FileExistsError: link(2) never replaces an existing name."""
        tmp = self._staged(data)
        try:
            os.link(tmp, self.path)
        finally:
            os.remove(tmp)

    def replace(self, data: bytes) -> None:
        os.replace(self._staged(data), self.path)

    def delete(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)


class _Fsspec:
    """gs:// and s3:// through gcsfs/s3fs, whose `mode="create"` is a conditional write."""

    def __init__(self, uri: str):
        import fsspec

        from pdm_jax.checkpoint.s3 import prepare

        prepare(scheme_of(uri))
        self.fs, root = fsspec.core.url_to_fs(uri)
        self.path = f"{root.rstrip('/')}/{RECORD}"

    def read(self) -> bytes | None:
        try:
            return self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None

    def create(self, data: bytes) -> None:
        self.fs.pipe_file(self.path, data, mode="create")

    def replace(self, data: bytes) -> None:
        self.fs.pipe_file(self.path, data)

    def delete(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path)


class _Azure:
    def __init__(self, uri: str):
        from pdm_jax.checkpoint.azure import parse_uri
        from pdm_jax.checkpoint.azure_client import container_client, ensure_container

        container, prefix = parse_uri(uri)
        client = container_client(container)
        ensure_container(client)
        self.blob = client.get_blob_client(f"{prefix}/{RECORD}" if prefix else RECORD)

    def read(self) -> bytes | None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            return self.blob.download_blob().readall()
        except ResourceNotFoundError:
            return None

    def create(self, data: bytes) -> None:
        from azure.core.exceptions import ResourceExistsError

        try:
            self.blob.upload_blob(data, overwrite=False)
        except ResourceExistsError:
            raise FileExistsError(self.blob.blob_name) from None

    def replace(self, data: bytes) -> None:
        self.blob.upload_blob(data, overwrite=True)

    def delete(self) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        with contextlib.suppress(ResourceNotFoundError):
            self.blob.delete_blob()


def _backend(uri: str) -> Any:
    scheme = scheme_of(uri)
    if scheme == "file":
        return _Local(uri)
    return _Azure(uri) if scheme == "az" else _Fsspec(uri)


class Ownership:
    """Claims `locations` (the workdir, the checkpoint store) for this process; a heartbeat
    thread keeps the records fresh until `release`."""

    def __init__(self, locations: list[str], timeout_s: float = 300.0, take_over: bool = False):
        self.locations = list(dict.fromkeys(locations))
        self.timeout_s = float(timeout_s)
        self.take_over = bool(take_over)
        self.heartbeat_s = min(HEARTBEAT_MAX_S, self.timeout_s / 4)
        now = time.time()
        self.record: dict[str, Any] = {
            "token": uuid.uuid4().hex,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start": _start_ticks(os.getpid()),
            "boot_id": _boot_id(),
            "started": now,
            "heartbeat": now,
        }
        self.lost: str | None = None  # why this run no longer owns a location
        self._held: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def claim(self) -> Ownership:
        """Claims every location or none: InUseError names the first one a live run owns."""
        try:
            for uri in self.locations:
                self._claim_one(uri, _backend(uri))
        except BaseException as err:
            self.release()
            if isinstance(err, PdmError) or not isinstance(err, Exception):
                raise
            # Only storage calls run here: whatever they raise is the storage's answer.
            raise PdmError(f"cannot claim {uri}: {describe_error(err)}") from err
        self._thread = threading.Thread(target=self._beat, name="pdm-owner", daemon=True)
        self._thread.start()
        return self

    def _data(self) -> bytes:
        self.record["heartbeat"] = time.time()
        return json.dumps(self.record, indent=1).encode()

    def _claim_one(self, uri: str, store: Any) -> None:
        # Read first: a store whose create is not conditional (an emulator, an S3 clone without
        # If-None-Match) still refuses a second run that starts after the first one.
        for _ in range(3):  # a record that vanishes between create and read: try again
            raw = store.read()
            if raw is None:
                try:
                    store.create(self._data())
                except FileExistsError:
                    continue
                self._held[uri] = store
                return
            other = _parse(raw)
            why = self._stale(other)
            if why is None:
                raise InUseError(_in_use(uri, other))
            log.warning("taking over %s from %s: %s", uri, _who(other), why)
            store.replace(self._data())
            current = _parse(store.read() or b"")
            if current.get("token") != self.record["token"]:
                raise InUseError(_in_use(uri, current))
            self._held[uri] = store
            return
        raise PdmError(f"cannot claim {uri}: its owner record keeps appearing and vanishing")

    def _stale(self, other: dict[str, Any]) -> str | None:
        """Why `other` may be replaced now, or None while its owner may be alive."""
        if self.take_over:
            return "checkpoint.take_over is set"
        if not other:
            return "its owner record is unreadable"
        same_host = other.get("host") == self.record["host"]
        if same_host and other.get("boot_id") and other["boot_id"] != self.record["boot_id"]:
            return "this host has restarted since"
        if same_host and not _alive(int(other.get("pid", -1)), str(other.get("pid_start", ""))):
            return "its process is no longer running on this host"
        age = time.time() - float(other.get("heartbeat", 0))
        if not same_host and age > self.timeout_s:
            return (
                f"its heartbeat is {age:.0f} s old (checkpoint.owner_timeout_s={self.timeout_s:g})"
            )
        return None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            for uri, store in list(self._held.items()):
                try:
                    current = _parse(store.read() or b"")
                    if current and current.get("token") != self.record["token"]:
                        self.lost = f"{uri} was taken over by {_who(current)}"
                        log.error("%s; this run stops at its next step", self.lost)
                        del self._held[uri]
                        continue
                    store.replace(self._data())
                except Exception as err:  # storage trouble: the next heartbeat tries again
                    log.warning("owner heartbeat for %s failed: %s", uri, describe_error(err))

    def release(self) -> None:
        """Removes this run's records (never another run's)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        for uri, store in list(self._held.items()):
            try:
                if _parse(store.read() or b"").get("token") == self.record["token"]:
                    store.delete()
            except Exception as err:
                log.warning("could not remove the owner record of %s: %s", uri, describe_error(err))
        self._held.clear()

    def __enter__(self) -> Ownership:
        return self.claim()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _who(record: dict[str, Any]) -> str:
    return f"{record.get('host', '?')}:{record.get('pid', '?')}"


def _in_use(uri: str, record: dict[str, Any]) -> str:
    started = _stamp(float(record.get("started", 0)))
    age = max(0.0, time.time() - float(record.get("heartbeat", 0)))
    return f"{uri} is in use by {_who(record)} since {started} (heartbeat {age:.0f} s ago)"
