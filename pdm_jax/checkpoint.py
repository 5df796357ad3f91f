"""`CheckpointStore`: one object over Orbax for every place a run saves to.

Why a wrapper at all: the training loop should say "save this state at this step" and "give me
the latest complete state, laid out for my mesh", and never branch on where the bytes go. Each
step holds two items: `state` (array pytrees: params, optimizer state, the best parameters so
far) and `meta` (plain JSON: step, data position, early-stopping counters, scaler, resolved
config, data fingerprint, format version). No pickle anywhere; a checkpoint alone is enough to
resume training or to predict.

Saves are asynchronous (training goes on while Orbax writes); a step becomes visible only once
committed, so a crash mid-save leaves the previous step as the latest. Retention keeps the last
`keep` steps plus the best one by validation RMSE; the metrics are stored with each step so the
best one survives a restart.

Backends: local paths and `file://` go to Orbax directly. `gs://` and `s3://` go to Orbax and
TensorStore too, committed by a commit file (S3 has no rename), with `pdm_jax.orbax_remote`
making `s3://` reachable and bounding TensorStore's retries. `az://` has no TensorStore driver:
`pdm_jax.azure_store` lets Orbax save locally, then uploads the step and writes a commit marker.

Storage faults must not stop training: a background save that fails is a warning and leaves the
previous step as the latest; `save()` never raises for storage trouble and, when the storage does
not answer, skips its step after a bounded wait (SAVE_WAIT_S, PROBE_S) instead of blocking; the
next save after an outage starts clean. A committed step that cannot be read back (a file
truncated or deleted) makes `restore` warn and fall back to the step before it.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import threading
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from pdm_jax import orbax_remote, parallel
from pdm_jax.configuration import flatten
from pdm_jax.errors import ConfigError, PdmError

log = logging.getLogger(__name__)

# 2: meta holds `calibration` (the best parameters' conformal band, pdm_jax/calibration.py);
# format 1 checkpoints load and resume, without a band until one is fitted again.
FORMAT_VERSION = 2
STATE, META = "state", "meta"
# Config keys a resumed run may change: how long and how often, where things are stored, what
# is logged, and where the (fingerprint-checked) data lives. Hardware-resolved keys (compute.*,
# grad_accum, remat, loader threads, distributed.*) follow the machine, not the run.
RESUMABLE_CHANGES = (
    "train.num_steps",
    "train.num_epochs",
    "train.eval_every",
    "train.log_every",
    "train.tensorboard",
    "train.plots",
    "train.grad_accum",
    "train.calibration",  # fitted after each evaluation; training itself never reads it
    "checkpoint.",
    "compute.",
    "distributed.",
    "model.remat",
    "data.data_dir",
    "data.paths",
    "data.test_paths",
    "data.download",
    "data.download_url",
    "data.num_threads",
    "data.prefetch",
)
SCHEMES = ("file", "gs", "s3", "az")
# (module, pip package) each remote scheme needs at runtime; all are in the `cloud` extra.
CLOUD_PACKAGES = {
    "gs": (("gcsfs", "gcsfs"),),
    "s3": (("s3fs", "s3fs"),),
    "az": (("azure.storage.blob", "azure-storage-blob"),),
}
# How long save() waits for an unfinished previous save before it checks whether the storage
# still answers (then it keeps waiting: slow, not down) or not (then it skips its own step:
# training matters more than one checkpoint). With PROBE_S this bounds save() during an outage.
SAVE_WAIT_S = 15.0
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


def scheme_of(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


def resolve_uri(uri: str | None, workdir: str) -> str:
    """The store's location: `uri`, else `<workdir>/checkpoints`; local paths made absolute."""
    if not uri:
        return os.path.abspath(os.path.join(workdir, "checkpoints"))
    if uri.startswith("file://"):
        return os.path.abspath(uri[len("file://") :])
    scheme = scheme_of(uri)
    if scheme not in SCHEMES:
        raise ConfigError(
            f"config.checkpoint.uri: scheme {scheme}:// is not supported (supported: a local "
            f"path, file://, gs://, s3://, az://), got {uri!r}"
        )
    if scheme == "file":
        return os.path.abspath(uri)
    bucket = uri.split("://", 1)[1].split("/", 1)[0]
    if not bucket:
        raise ConfigError(
            f"config.checkpoint.uri: {uri!r} names no bucket (expected {scheme}://BUCKET/PREFIX)"
        )
    return uri.rstrip("/")


def require_packages(scheme: str) -> None:
    """One line naming the missing package and the extra, instead of a deep ImportError later."""
    for module, package in CLOUD_PACKAGES.get(scheme, ()):
        try:
            importlib.import_module(module)
        except ImportError:
            raise ConfigError(
                f'{scheme}:// checkpoints need the {package} package: pip install "pdm-jax[cloud]"'
            ) from None


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


def _best_metric(metrics: Mapping[str, Any]) -> float:
    value = metrics.get("val_rmse")
    return float("inf") if value is None else float(value)


def preservation_policy(keep: int, keep_best: bool) -> policies.PreservationPolicy:
    """Keep the last `keep` steps, plus the one with the smallest validation RMSE."""
    keepers: list[Any] = [policies.LatestN(n=max(int(keep), 1))]
    if keep_best:
        keepers.append(
            policies.BestN(
                get_metric_fn=_best_metric,
                reverse=True,  # smallest validation RMSE is best
                n=1,
                keep_checkpoints_without_metrics=False,
            )
        )
    return policies.AnyPreservationPolicy(keepers)


def _orbax_manager(
    uri: str, scheme: str, policy: policies.PreservationPolicy, create: bool
) -> ocp.CheckpointManager:
    remote: dict[str, Any] = {}
    if scheme in ("gs", "s3"):
        orbax_remote.prepare(scheme)
        remote = {
            # A commit file instead of a rename: S3 has no rename (s3fs's copy+delete fails
            # mid-way), and it is what Orbax already does on gs://.
            "atomicity_options": ocp.options.AtomicityOptions(
                mode=ocp.options.AtomicityMode.COMMIT_FILE
            ),
            # No existence checks on the calling thread: against a stopped server each one
            # blocks for the client's whole retry budget (~30 s with gcsfs) before failing.
            "file_options": ocp.options.FileOptions(skip_sync_file_validations=True),
            # Create the step directory on the calling thread (one round trip, after `_probe`):
            # created in the background, a failure leaves Orbax's writer threads waiting for it
            # for 300 s, which also holds up the end of the process.
            "async_options": ocp.options.AsyncOptions(create_directories_asynchronously=False),
        }
    options = ocp.CheckpointManagerOptions(
        create=create,
        enable_async_checkpointing=True,
        preservation_policy=policy,
        # Not used for ranking (the policy does that), but makes Orbax store each step's
        # metrics, without which BestN forgets the best step after a restart.
        best_fn=_best_metric,
        best_mode="min",
        # Only a writer removes unfinished steps: a reader could be looking at another run
        # that is saving right now.
        cleanup_tmp_directories=create,
        **remote,
    )
    return ocp.CheckpointManager(uri, item_names=(STATE, META), options=options)


class CheckpointStore:
    """Async saves with keep-last-N plus keep-best; restores the latest complete step."""

    def __init__(
        self,
        uri: str,
        keep: int = 3,
        keep_best: bool = True,
        create: bool = True,
        *,
        save_wait_s: float = SAVE_WAIT_S,
        probe_s: float = PROBE_S,
        staging_dir: str | None = None,
    ):
        """`save_wait_s`/`probe_s`: bounds on save() (see SAVE_WAIT_S, PROBE_S); `staging_dir`
        (az:// only): where steps are written before upload, by default a temporary directory."""
        self.uri = uri
        self.scheme = scheme_of(uri)
        require_packages(self.scheme)
        self._save_wait_s = float(save_wait_s)
        self._probe_s = float(probe_s)
        self._probers: list[threading.Thread] = []
        policy = preservation_policy(keep, keep_best)
        try:
            if self.scheme == "az":
                from pdm_jax.azure_store import AzureCheckpointManager

                self._manager: Any = AzureCheckpointManager(
                    uri, policy, create=create, staging_dir=staging_dir
                )
            else:
                self._manager = _orbax_manager(uri, self.scheme, policy, create)
        except PdmError:
            raise
        except Exception as err:
            if is_unreachable(err):
                raise PdmError(
                    f"checkpoint storage {uri} is unreachable: {describe_error(err)}"
                ) from err
            raise
        self._watcher: threading.Thread | None = None
        self._pending: int | None = None
        self._watch_failed = False  # the watcher saw the last background save fail
        self._resync = False  # the step list in memory may be stale after a failure
        self._last_ok = True
        self._unusable: set[int] = set()
        # Steps still stored that a failed Orbax save dropped from its memory (it forgets the
        # old steps it meant to delete); listed until storage can be re-read.
        self._hidden: set[int] = set()
        self._before: set[int] = set()

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """Committed steps, oldest first; a step still being saved is not one yet."""
        steps = set(self._manager.all_steps()) | self._hidden
        watcher, pending = self._watcher, self._pending
        if pending is not None and watcher is not None and watcher.is_alive():
            steps.discard(pending)
        return sorted(steps)

    def save(
        self,
        step: int,
        state: Any,
        meta: Mapping[str, Any],
        metrics: Mapping[str, float] | None = None,
    ) -> bool:
        """Starts an async save of `step`; returns once the arrays are copied off the devices.

        Storage trouble never raises here: it is logged, and False says no save was started
        (the storage did not answer, or this save failed to start).
        """
        step = int(step)
        meta = {**meta, "format_version": FORMAT_VERSION, "step": step}
        if not self._settle(step) or not self._probe(step):
            return False
        if step in self._unusable:
            self._discard(step)
        self._before = set(self._manager.all_steps())
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    **{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}
                ),
                # {} rather than None: Orbax warns on every save without metrics otherwise, and
                # ranks a step without val_rmse last either way.
                metrics=dict(metrics) if metrics else {},
                force=True,
            )
        except Exception as err:
            if not (isinstance(err, OSError) or is_unreachable(err)):
                raise  # a bug or a bad state, not storage trouble
            self._resync, self._last_ok = True, False
            self._hidden |= self._before - set(self._manager.all_steps())
            log.warning(
                "checkpoint step %d was not saved to %s (%s); the latest complete step stays %s",
                step,
                self.uri,
                describe_error(err),
                self.latest_step(),
            )
            return False
        self._pending = step
        self._watcher = threading.Thread(
            target=self._watch, args=(step,), name=f"pdm-checkpoint-{step}", daemon=True
        )
        self._watcher.start()
        return True

    def _watch(self, step: int) -> None:
        """Waits for one background save so its failure is logged when it happens, and
        re-lists the steps once storage works again after an earlier failure."""
        try:
            self._manager.wait_until_finished()
        except Exception as err:
            self._watch_failed, self._resync, self._last_ok = True, True, False
            self._hidden |= self._before - set(self._manager.all_steps())
            log.warning(
                "checkpoint step %d could not be written to %s (%s); it is not committed and "
                "the latest complete step stays %s",
                step,
                self.uri,
                describe_error(err),
                self.latest_step(),
            )
            return
        self._last_ok = True
        if self._resync:
            # A failed save drops the steps it meant to delete from Orbax's memory although
            # they are still stored; re-listing brings them back under retention.
            try:
                self._manager.reload()
                self._resync = False
                self._hidden.clear()
            except Exception as err:
                log.warning(
                    "could not re-list the steps in %s (%s); trying again after the next save",
                    self.uri,
                    describe_error(err),
                )

    def _settle(self, step: int) -> bool:
        """Lets the previous save finish first; False (skip this step) if storage is down.

        A save still running after `save_wait_s` is either slow or stuck: if the storage
        answers a quick check it is slow, and this one waits for it as Orbax would (skipping
        would lose, say, the final or the preemption save); if not, this step is skipped.
        Process 0 decides for all processes (`parallel.agree`): a save entered by only some
        of them would deadlock in Orbax's barriers.
        """
        watcher = self._watcher
        if watcher is None:
            return True
        watcher.join(self._save_wait_s)
        running = watcher.is_alive()
        reason = self._unreachable_reason() if running and jax.process_index() == 0 else None
        if parallel.agree(reason is not None):
            self._last_ok = False
            if reason is not None:
                log.warning(
                    "checkpoint step %d skipped: saving step %s to %s is still running after "
                    "%.0f s and the storage does not answer (%s)",
                    step,
                    self._pending,
                    self.uri,
                    self._save_wait_s,
                    reason,
                )
            return False
        if running:
            log.info(
                "checkpoint step %d waits for step %s, still being written to %s (slow storage)",
                step,
                self._pending,
                self.uri,
            )
        watcher.join()
        self._reap()
        return True

    def _probe(self, step: int) -> bool:
        """Bounded check that gs:// or s3:// answers before Orbax writes to it on this thread.

        Orbax creates the step directory in save() itself; against a stopped or unreachable
        server that blocks for the client's whole retry budget (~30 s with gcsfs, and without
        a limit when packets are dropped). The check runs in a helper thread, so this thread
        waits at most `probe_s`. Process 0 checks and decides for all.
        """
        if self.scheme not in ("gs", "s3"):
            return True
        reason = self._unreachable_reason() if jax.process_index() == 0 else None
        if not parallel.agree(reason is not None):
            return True
        self._last_ok = False
        if reason is not None:
            log.warning(
                "checkpoint step %d skipped: %s does not answer (%s); the latest complete step "
                "stays %s",
                step,
                self.uri,
                reason,
                self.latest_step(),
            )
        return False

    def _unreachable_reason(self) -> str | None:
        """None if the storage answered a request within `probe_s`, else why not."""
        if self.scheme == "file":
            return None
        # Checks that got no answer go on in the background until the client gives up; a new
        # one starts anyway (the storage may be back), up to a few at a time.
        self._probers = [t for t in self._probers if t.is_alive()]
        if len(self._probers) >= MAX_PROBES:
            return f"{len(self._probers)} earlier checks are still waiting for an answer"
        outcome: list[BaseException] = []
        ping = getattr(self._manager, "ping", None) or self._list_root

        def check() -> None:
            try:
                ping()
            except Exception as err:
                outcome.append(err)

        prober = threading.Thread(target=check, name="pdm-checkpoint-probe", daemon=True)
        prober.start()
        prober.join(self._probe_s)
        if prober.is_alive():
            self._probers.append(prober)
            return f"no answer in {self._probe_s:.0f} s"
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

    def _reap(self) -> None:
        self._watcher, self._pending = None, None
        if self._watch_failed:
            self._watch_failed = False
            # Orbax re-raises a background failure once in each thread that waits; the watcher
            # has reported it, so take this thread's copy now rather than inside the next save.
            with contextlib.suppress(Exception):
                self._manager.wait_until_finished()

    def _discard(self, step: int) -> None:
        """Deletes a stored step found unusable, so the same step number can be saved again."""
        self._unusable.discard(step)
        if step not in self._manager.all_steps():
            return
        log.warning("deleting unusable checkpoint step %d in %s to save it again", step, self.uri)
        try:
            self._manager.delete(step)
        except Exception as err:
            log.warning("could not delete step %d in %s (%s)", step, self.uri, describe_error(err))

    def restore_meta(self, step: int | None = None) -> dict[str, Any]:
        """The meta item of `step` (default: the latest usable complete step)."""
        _, meta = self._restore_usable(step, {META: ocp.args.JsonRestore()})
        return meta

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """(state laid out like `target`, meta) of `step` (default: the latest complete one).

        `target` holds arrays or `jax.ShapeDtypeStruct`s with the shardings wanted now, so a
        state saved on 8 devices restores onto 1, or the reverse. A step that cannot be read
        (a file missing or truncated) is skipped with a warning for the one before it; the
        returned meta says which step was restored.
        """
        abstract = jax.tree.map(_abstract, target)
        out, meta = self._restore_usable(
            step, {STATE: ocp.args.StandardRestore(abstract), META: ocp.args.JsonRestore()}
        )
        return out[STATE], meta

    def _restore_usable(self, step: int | None, items: dict[str, Any]) -> tuple[Any, dict]:
        steps = self.all_steps()
        if step is not None and int(step) not in steps:
            raise ConfigError(
                f"checkpoint step {step} is not a complete step in {self.uri} "
                f"(complete steps: {steps or 'none'})"
            )
        candidates = [s for s in reversed(steps) if step is None or s <= int(step)]
        if not candidates:
            raise ConfigError(f"no complete checkpoint in {self.uri}")
        problems: list[str] = []
        for i, current in enumerate(candidates):
            try:
                out = self._manager.restore(current, args=ocp.args.Composite(**items))
                meta = dict(out[META])
            except Exception as err:
                if is_unreachable(err):
                    raise PdmError(
                        f"checkpoint storage {self.uri} is unreachable while reading step "
                        f"{current}: {describe_error(err)}"
                    ) from err
                self._unusable.add(current)
                problems.append(f"step {current}: {describe_error(err)}")
                after = f"; trying step {candidates[i + 1]}" if i + 1 < len(candidates) else ""
                log.warning(
                    "checkpoint step %d in %s is unusable (%s)%s",
                    current,
                    self.uri,
                    describe_error(err),
                    after,
                )
                continue
            if meta.get("format_version", 0) > FORMAT_VERSION:
                raise ConfigError(
                    f"checkpoint {self.uri} step {current} has format {meta['format_version']}, "
                    f"newer than this pdm-jax reads ({FORMAT_VERSION}); upgrade pdm-jax"
                )
            return out, meta
        raise PdmError(f"no usable checkpoint in {self.uri}: " + "; ".join(problems))

    def wait(self, timeout_s: float | None = None) -> bool:
        """Waits for the save in flight; True if the last save was committed. Never raises."""
        watcher = self._watcher
        if watcher is not None:
            watcher.join(timeout_s)
            if watcher.is_alive():
                return False
            self._reap()
        return self._last_ok

    def close(self) -> None:
        self.wait()
        try:
            self._manager.close()
        except Exception as err:
            log.warning("closing checkpoint store %s: %s", self.uri, describe_error(err))

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _abstract(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    arr = np.asarray(x)
    return jax.ShapeDtypeStruct(arr.shape, arr.dtype)


# Keys added to the config after checkpoints were first written, each with the value that does
# what the code did before the key existed: a checkpoint saved without one reads as having that
# value, so adding a key never strands a run that can still resume exactly.
ADDED_KEYS: dict[str, Any] = {
    "data.baseline_cycles": 0,
    "data.min_history": 0,
    "data.use_time": False,
    "model.ensemble": 1,
    "model.target_offset": 0.0,
    "train.input_noise": 0.0,
    "train.select_on": "all",
}


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ, other than those a resume may change."""
    flat_saved, flat_now = flatten(saved), flatten(current)
    flat_saved = {**{k: v for k, v in ADDED_KEYS.items() if k in flat_now}, **flat_saved}
    keys = sorted(set(flat_saved) | set(flat_now))
    return [
        k
        for k in keys
        if _norm(flat_saved.get(k)) != _norm(flat_now.get(k))
        and not any(k == p or (p.endswith(".") and k.startswith(p)) for p in RESUMABLE_CHANGES)
    ]


def _norm(value: Any) -> Any:
    """JSON round trips turn tuples into lists; compare them as equal."""
    if isinstance(value, tuple | list):
        return [_norm(v) for v in value]
    return value
