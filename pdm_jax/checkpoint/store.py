"""`CheckpointStore`: one object over Orbax for every place a run saves to.

Why a wrapper at all: the training loop should say "save this state at this step" and "give me
the latest complete state, laid out for my mesh", and never branch on where the bytes go.

Saves are asynchronous (training goes on while Orbax writes); a step becomes visible only once
committed, so a crash mid-save leaves the previous step as the latest.

Storage faults must not stop training: a background save that fails is a warning and leaves the
previous step as the latest; `save()` never raises for storage trouble and, when the storage does
not answer, skips its step after a bounded wait (SAVE_WAIT_S, PROBE_S) instead of blocking; the
next save after an outage starts clean. A full storage is the exception: it ends the run with
one line after FULL_TRIES saves in a row (or the run's last save) failed for lack of space
(`faults.FullStorage`), since every further step would be lost too. A committed step that
cannot be read back (a file truncated or deleted, or bytes that differ from the SHA-256 sums
recorded after its commit) makes `restore` warn and fall back to the step before it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from pdm_jax import parallel
from pdm_jax.checkpoint import checksums
from pdm_jax.checkpoint.azure import AzureCheckpointManager
from pdm_jax.checkpoint.faults import (
    PROBE_S,
    FullStorage,
    Prober,
    describe_error,
    is_unreachable,
)
from pdm_jax.checkpoint.managers import orbax_manager, preservation_policy
from pdm_jax.checkpoint.meta import META, STATE, check_format, stamp
from pdm_jax.checkpoint.uri import require_packages, scheme_of
from pdm_jax.errors import ConfigError, PdmError

# The package's logger: records keep the name (`pdm_jax.checkpoint`) they had before the split.
log = logging.getLogger(__package__)

# How long save() waits for an unfinished previous save before it checks whether the storage
# still answers (then it keeps waiting: slow, not down) or not (then it skips its own step:
# training matters more than one checkpoint). With PROBE_S this bounds save() during an outage.
SAVE_WAIT_S = 15.0


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
        policy = preservation_policy(keep, keep_best)
        try:
            if self.scheme == "az":
                self._manager: Any = AzureCheckpointManager(
                    uri, policy, create=create, staging_dir=staging_dir
                )
            else:
                self._manager = orbax_manager(uri, self.scheme, policy, create)
        except PdmError:
            raise
        except Exception as err:
            if is_unreachable(err):
                raise PdmError(
                    f"checkpoint storage {uri} is unreachable: {describe_error(err)}"
                ) from err
            raise
        self._prober = Prober(uri, self.scheme, getattr(self._manager, "ping", None), probe_s)
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
        self._full = FullStorage(uri, self.scheme)

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
        (the storage did not answer, or this save failed to start). The one exception is a
        full storage: after FULL_TRIES saves in a row failed for lack of space, StorageFullError.
        """
        step = int(step)
        meta = stamp(meta, step)
        if not self._settle(step):
            return False
        self._full.check(self.latest_step())
        if not self._probe(step):
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
            self._full.note(step, err)
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
            self._full.note(step, err)
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
        self._full.clear()
        self._record_checksums(step)
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

    def _record_checksums(self, step: int) -> None:
        """Process 0 sums the committed step's files (all processes' files are in by now)."""
        if self.scheme == "az" or jax.process_index() != 0:
            return  # the Azure commit marker holds them already
        try:
            checksums.record(self.uri, step)
        except Exception as err:
            log.warning(
                "checksums of step %d in %s were not recorded (%s); it restores unchecked",
                step,
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
        reason = self._prober.unreachable_reason() if running and jax.process_index() == 0 else None
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
        reason = self._prober.unreachable_reason() if jax.process_index() == 0 else None
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
        state saved on 8 devices restores onto 1, or the reverse; None restores the state as
        saved, into host arrays. A step that cannot be read (a file missing or truncated) is
        skipped with a warning for the one before it; the returned meta says which step was
        restored.
        """
        abstract = None if target is None else jax.tree.map(_abstract, target)
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
                if self.scheme != "az":
                    checksums.verify(self.uri, current, items)
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
            check_format(self.uri, current, meta)
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
        """Waits for the save in flight; StorageFullError if it failed for lack of space."""
        self.wait()
        try:
            self._manager.close()
        except Exception as err:
            log.warning("closing checkpoint store %s: %s", self.uri, describe_error(err))
        self._full.check(self.latest_step(), final=True)

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
