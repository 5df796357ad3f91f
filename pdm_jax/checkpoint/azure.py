"""`az://container/prefix` checkpoints: Orbax saves locally, a worker uploads and commits the step.

Why staging: TensorStore has no Azure driver and Orbax's path handling breaks on `az://` (see
docs/DESIGN.md), so each step is saved by Orbax into a local staging directory, exactly like a
local store (save() returns once the arrays are off the devices). A background worker then
uploads the step directory in parallel and writes `<prefix>/<step>/pdm-commit.json` last. That
marker is the commit: it lists every file with its size and SHA-256 plus the step's metrics, so a
restore can tell a complete step from a damaged one and retention can rank steps without reading
them. Files of a step without a marker are invisible, and the writer sweeps them after its next
commit.

Why azure-storage-blob and not adlfs: adlfs gives no say over the SDK's retry policy (15 s initial
backoff, growing), and a save during an outage must fail in seconds, not minutes.

Staging keeps a whole step on one machine's disk, so this store is for single-process runs;
multi-host jobs use gs:// or s3://, which Orbax writes from every host directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from pdm_jax.checkpoint.azure_client import container_client, ensure_container
from pdm_jax.checkpoint.faults import describe_error
from pdm_jax.errors import ConfigError

log = logging.getLogger(__name__)

MARKER = "pdm-commit.json"
MARKER_VERSION = 1
TRANSFER_THREADS = 8


class CorruptStepError(ValueError):
    """A committed step whose files no longer match its commit marker."""


@dataclasses.dataclass(frozen=True)
class Commit:
    """One committed step, as its marker records it (Orbax's PolicyCheckpointInfo shape)."""

    step: int
    time: datetime.datetime
    metrics: dict[str, Any] | None
    files: dict[str, tuple[int, str]]  # relative path -> (size in bytes, sha256 hex)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format_version": MARKER_VERSION,
                "step": self.step,
                "time": self.time.isoformat(),
                "metrics": self.metrics,
                "files": {rel: list(entry) for rel, entry in sorted(self.files.items())},
            }
        )

    @classmethod
    def from_json(cls, step: int, text: bytes) -> Commit:
        try:
            data = json.loads(text)
            if int(data["step"]) != step:
                raise ValueError(f"it names step {data['step']}")
            files = {
                str(rel): (int(size), str(digest)) for rel, (size, digest) in data["files"].items()
            }
            when = datetime.datetime.fromisoformat(data["time"])
            metrics = data.get("metrics")
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CorruptStepError(f"the commit marker is unreadable ({err})") from err
        return cls(step, when, dict(metrics) if isinstance(metrics, dict) else None, files)


def parse_uri(uri: str) -> tuple[str, str]:
    """(container, prefix without slashes at either end) of `az://container/prefix`."""
    container, _, prefix = uri.removeprefix("az://").partition("/")
    return container, prefix.strip("/")


class AzureCheckpointManager:
    """The part of Orbax's `CheckpointManager` API that `CheckpointStore` uses, over Azure Blob.

    `save` starts the local Orbax save and queues the upload; `wait_until_finished` raises the
    failure of the last queued upload once; steps listed by `all_steps` are committed ones.
    """

    def __init__(
        self,
        uri: str,
        preservation_policy: policies.PreservationPolicy,
        *,
        create: bool,
        staging_dir: str | None = None,
    ) -> None:
        if jax.process_count() > 1:
            raise ConfigError(
                f"config.checkpoint.uri: az:// checkpoints are staged on one machine's disk and "
                f"support single-process runs only ({jax.process_count()} processes); use gs:// "
                "or s3:// for multi-host training"
            )
        self.uri = uri
        container, prefix = parse_uri(uri)
        self._root = f"{prefix}/" if prefix else ""
        self._policy = preservation_policy
        self._client = container_client(container)
        if create:
            ensure_container(self._client)
        self._own_staging = staging_dir is None
        self._staging = staging_dir or tempfile.mkdtemp(prefix="pdm-jax-az-staging-")
        os.makedirs(self._staging, exist_ok=True)
        self._writer: ocp.AsyncCheckpointer | None = None
        self._reader: ocp.Checkpointer | None = None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="pdm-az-commit")
        self._job: Future[None] | None = None
        self._lock = threading.Lock()
        self._commits: dict[int, Commit] = {}
        self.reload()

    # --- listing ---------------------------------------------------------------------------

    def reload(self) -> None:
        """Re-reads which steps are committed (their markers) from the container."""
        commits: dict[int, Commit] = {}
        for name in self._client.list_blob_names(name_starts_with=self._root):
            step_dir, _, rest = name[len(self._root) :].partition("/")
            if rest != MARKER or not step_dir.isdigit():
                continue
            step = int(step_dir)
            try:
                commits[step] = Commit.from_json(step, self._client.download_blob(name).readall())
            except CorruptStepError as err:
                log.warning("checkpoint step %d in %s is ignored: %s", step, self.uri, err)
        with self._lock:
            self._commits = commits

    def ping(self) -> None:
        """One cheap request, to tell slow storage from unreachable storage."""
        self._client.get_container_properties()

    def all_steps(self) -> list[int]:
        with self._lock:
            return sorted(self._commits)

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    # --- saving ----------------------------------------------------------------------------

    def save(
        self,
        step: int,
        *,
        args: ocp.args.Composite,
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves `step` to local staging (async) and queues its upload and commit."""
        del force  # saving is always explicit here
        self.wait_until_finished()
        if step in self.all_steps():
            raise ValueError(f"checkpoint step {step} already exists in {self.uri}")
        staged = os.path.join(self._staging, str(step))
        shutil.rmtree(staged, ignore_errors=True)
        if self._writer is None:
            self._writer = ocp.AsyncCheckpointer(ocp.CompositeCheckpointHandler())
        self._writer.save(staged, args=args)
        metrics = dict(metrics) if metrics else None
        self._job = self._worker.submit(self._commit, step, staged, metrics)
        return True

    def wait_until_finished(self) -> None:
        """Blocks until the queued upload ends; raises its failure to the first caller only."""
        job = self._job
        if job is None:
            return
        try:
            job.result()
        finally:
            with self._lock:
                if self._job is job:
                    self._job = None

    def _commit(self, step: int, staged: str, metrics: dict[str, Any] | None) -> None:
        try:
            assert self._writer is not None
            self._writer.wait_until_finished()
            files = _inventory(staged)
            self._transfer(self._upload, ((rel, staged, step) for rel in files))
            commit = Commit(step, datetime.datetime.now(datetime.UTC), metrics, files)
            self._client.upload_blob(self._name(step, MARKER), commit.to_json(), overwrite=True)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        with self._lock:
            self._commits[step] = commit
        try:
            self._apply_retention()
        except Exception as err:
            log.warning(
                "checkpoint step %d is committed to %s, but removing old steps failed (%s); "
                "retried after the next save",
                step,
                self.uri,
                describe_error(err),
            )

    def _upload(self, rel: str, staged: str, step: int) -> None:
        with open(os.path.join(staged, rel), "rb") as data:
            self._client.upload_blob(self._name(step, rel), data, overwrite=True, max_concurrency=2)

    # --- retention -------------------------------------------------------------------------

    def _apply_retention(self) -> None:
        with self._lock:
            commits = [self._commits[s] for s in sorted(self._commits)]
        keep = self._policy.should_preserve(commits, context=policies.PreservationContext())
        for commit, kept in zip(commits, keep, strict=True):
            if not kept:
                self.delete(commit.step)
        self._sweep_uncommitted()

    def delete(self, step: int) -> None:
        """Removes a step: its marker first, so a half-finished delete leaves it invisible."""
        from azure.core.exceptions import ResourceNotFoundError

        with self._lock:
            self._commits.pop(step, None)
        with contextlib.suppress(ResourceNotFoundError):
            self._client.delete_blob(self._name(step, MARKER))
        prefix = f"{self._root}{step}/"
        self._transfer(
            self._delete_blob,
            ((name,) for name in self._client.list_blob_names(name_starts_with=prefix)),
        )

    def _sweep_uncommitted(self) -> None:
        """Deletes files of steps that never got a marker (uploads cut short by a failure)."""
        committed = set(self.all_steps())
        orphans = []
        for name in self._client.list_blob_names(name_starts_with=self._root):
            step_dir = name[len(self._root) :].partition("/")[0]
            if step_dir.isdigit() and int(step_dir) not in committed:
                orphans.append((name,))
        self._transfer(self._delete_blob, orphans)

    def _delete_blob(self, name: str) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        with contextlib.suppress(ResourceNotFoundError):
            self._client.delete_blob(name)

    # --- restoring -------------------------------------------------------------------------

    def restore(self, step: int, *, args: ocp.args.Composite) -> Any:
        """Downloads (only the items in `args`), verifies against the marker, restores locally."""
        with self._lock:
            commit = self._commits.get(step)
        if commit is None:
            raise FileNotFoundError(f"checkpoint step {step} is not committed in {self.uri}")
        items = set(args.keys())
        wanted = {
            rel: entry
            for rel, entry in commit.files.items()
            if "/" not in rel or rel.partition("/")[0] in items
        }
        with tempfile.TemporaryDirectory(prefix="restore-", dir=self._staging) as tmp:
            target = os.path.join(tmp, str(step))
            problems: list[str] = []

            def fetch(rel: str) -> None:
                try:
                    self._download(step, rel, wanted[rel], target)
                except CorruptStepError as err:
                    problems.append(str(err))

            self._transfer(fetch, ((rel,) for rel in sorted(wanted)))
            if problems:
                raise CorruptStepError("; ".join(sorted(problems)))
            if self._reader is None:
                self._reader = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
            return self._reader.restore(target, args=args)

    def _download(self, step: int, rel: str, entry: tuple[int, str], target: str) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        size, digest = entry
        path = os.path.join(target, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            stream = self._client.download_blob(self._name(step, rel))
        except ResourceNotFoundError:
            raise CorruptStepError(f"file {rel} is missing") from None
        sha, got = hashlib.sha256(), 0
        with open(path, "wb") as out:
            for chunk in stream.chunks():
                out.write(chunk)
                sha.update(chunk)
                got += len(chunk)
        if got != size:
            raise CorruptStepError(f"file {rel} is {got} bytes, expected {size}")
        if sha.hexdigest() != digest:
            raise CorruptStepError(f"file {rel} does not match the SHA-256 in its commit marker")

    # --- plumbing --------------------------------------------------------------------------

    def _name(self, step: int, rel: str) -> str:
        return f"{self._root}{step}/{rel}"

    def _transfer(self, fn: Callable[..., None], calls: Iterable[tuple[Any, ...]]) -> None:
        """Runs `fn` over `calls` in parallel; on the first failure the calls not yet started
        are dropped (the storage is likely down: no point in each one retrying), and it raises."""
        with ThreadPoolExecutor(TRANSFER_THREADS, thread_name_prefix="pdm-az-io") as pool:
            futures = [pool.submit(fn, *call) for call in calls]
            _, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for future in pending:
                future.cancel()
        for future in futures:
            if not future.cancelled():
                future.result()

    def close(self) -> None:
        try:
            self.wait_until_finished()
        finally:
            self._worker.shutdown(wait=True)
            for checkpointer in (self._writer, self._reader):
                if checkpointer is not None:
                    checkpointer.close()
            self._client.close()
            if self._own_staging:
                shutil.rmtree(self._staging, ignore_errors=True)


def _inventory(directory: str) -> dict[str, tuple[int, str]]:
    """Every file under `directory` (POSIX relative path) with its size and SHA-256."""
    files: dict[str, tuple[int, str]] = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            sha, size = hashlib.sha256(), 0
            with open(path, "rb") as data:
                while chunk := data.read(1 << 20):
                    sha.update(chunk)
                    size += len(chunk)
            rel = os.path.relpath(path, directory).replace(os.sep, "/")
            files[rel] = (size, sha.hexdigest())
    return files
