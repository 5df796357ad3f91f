"""The Orbax `CheckpointManager` behind a store, and the retention policy every backend shares.

Why here and not in the store: which Orbax options a scheme needs (commit files on object
storage, no blocking checks on the calling thread) is a fact about Orbax, while the store only
decides when to save and what to do when storage fails.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from pdm_jax.checkpoint.meta import META, STATE
from pdm_jax.checkpoint.s3 import prepare as prepare_remote


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


def orbax_manager(
    uri: str, scheme: str, policy: policies.PreservationPolicy, create: bool
) -> ocp.CheckpointManager:
    """Orbax's manager for a local, `gs://` or `s3://` store (`az://` is `azure.py`'s)."""
    remote: dict[str, Any] = {}
    if scheme in ("gs", "s3"):
        prepare_remote(scheme)
        remote = {
            # A commit file instead of a rename: S3 has no rename (s3fs's copy+delete fails
            # mid-way), and it is what Orbax already does on gs://.
            "atomicity_options": ocp.options.AtomicityOptions(
                mode=ocp.options.AtomicityMode.COMMIT_FILE
            ),
            # No existence checks on the calling thread: against a stopped server each one
            # blocks for the client's whole retry budget (~30 s with gcsfs) before failing.
            "file_options": ocp.options.FileOptions(skip_sync_file_validations=True),
            # Create the step directory on the calling thread (one round trip, after the store's
            # `_probe`): created in the background, a failure leaves Orbax's writer threads
            # waiting for it for 300 s, which also holds up the end of the process.
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
