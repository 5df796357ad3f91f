"""Checkpoints: one `CheckpointStore` over Orbax for every place a run saves to.

Why a package: the store, what it saves beside the arrays, and the two backends that need more
than Orbax gives are separate concerns, and callers should see only this one name
(`checkpoint.CheckpointStore`, `checkpoint.resolve_uri`, ...) whatever the layout below.

Each step holds two items: `state` (array pytrees: params, optimizer state, the best parameters
so far) and `meta` (plain JSON: step, data position, early-stopping counters, scaler, resolved
config, data fingerprint, format version). No pickle anywhere; a checkpoint alone is enough to
resume training or to predict. Retention keeps the last `keep` steps plus the best one by
validation RMSE; the metrics are stored with each step so the best one survives a restart.

Backends: local paths and `file://` go to Orbax directly. `gs://` and `s3://` go to Orbax and
TensorStore too, committed by a commit file (S3 has no rename), with `checkpoint.s3` making
`s3://` reachable and bounding TensorStore's retries. `az://` has no TensorStore driver:
`checkpoint.azure` lets Orbax save locally, then uploads the step and writes a commit marker.

Modules: `store` (the store and its fault handling), `meta` (format version, config
compatibility), `owner` (one run per workdir and store), `clock` (when to save), `uri`
(schemes and packages), `faults` (unreachable storage), `managers` (Orbax options and
retention), `s3`, `azure` and `azure_client` (the backends).
"""

from pdm_jax.checkpoint.clock import SaveClock
from pdm_jax.checkpoint.faults import MAX_PROBES, PROBE_S, describe_error, is_unreachable
from pdm_jax.checkpoint.managers import preservation_policy
from pdm_jax.checkpoint.meta import (
    ADDED_KEYS,
    FORMAT_VERSION,
    META,
    RESUMABLE_CHANGES,
    STATE,
    config_differences,
    with_added_keys,
)
from pdm_jax.checkpoint.owner import InUseError, Ownership
from pdm_jax.checkpoint.store import SAVE_WAIT_S, CheckpointStore
from pdm_jax.checkpoint.uri import CLOUD_PACKAGES, SCHEMES, require_packages, resolve_uri, scheme_of

__all__ = [
    "ADDED_KEYS",
    "CLOUD_PACKAGES",
    "FORMAT_VERSION",
    "MAX_PROBES",
    "META",
    "PROBE_S",
    "RESUMABLE_CHANGES",
    "SAVE_WAIT_S",
    "SCHEMES",
    "STATE",
    "CheckpointStore",
    "InUseError",
    "Ownership",
    "SaveClock",
    "config_differences",
    "describe_error",
    "is_unreachable",
    "preservation_policy",
    "require_packages",
    "resolve_uri",
    "scheme_of",
    "with_added_keys",
]
