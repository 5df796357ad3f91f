"""`CheckpointStore`: one object over an Orbax `CheckpointManager` for every place a run saves to.

Why a wrapper at all: the training loop should say "save this state at this step" and "give me
the latest complete state, laid out for my mesh", and never branch on where the bytes go. Each
step holds two items: `state` (array pytrees: params, optimizer state, the best parameters so
far) and `meta` (plain JSON: step, data position, early-stopping counters, scaler, resolved
config, data fingerprint, format version). No pickle anywhere; a checkpoint alone is enough to
resume training or to predict.

Saves are asynchronous (training goes on while Orbax writes); a step becomes visible only once
committed, so a crash mid-save leaves the previous step as the latest. Retention keeps the last
`keep` steps plus the best one by validation RMSE.

Backends: local paths and `file://` go to Orbax directly; `gs://` is native to Orbax/tensorstore.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from pdm_jax.errors import ConfigError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
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
    "train.grad_accum",
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
SCHEMES = ("file", "gs")


def resolve_uri(uri: str | None, workdir: str) -> str:
    """The store's location: `uri`, else `<workdir>/checkpoints`; local paths made absolute."""
    if not uri:
        return os.path.abspath(os.path.join(workdir, "checkpoints"))
    if uri.startswith("file://"):
        return os.path.abspath(uri[len("file://") :])
    scheme = uri.split("://", 1)[0] if "://" in uri else "file"
    if scheme not in SCHEMES:
        raise ConfigError(
            f"config.checkpoint.uri: scheme {scheme}:// is not supported yet "
            f"(supported: a local path, file://, gs://), got {uri!r}"
        )
    return uri if scheme != "file" else os.path.abspath(uri)


def _best_metric(metrics: Mapping[str, Any]) -> float:
    value = metrics.get("val_rmse")
    return float("inf") if value is None else float(value)


class CheckpointStore:
    """Async saves with keep-last-N plus keep-best; restores the latest complete step."""

    def __init__(self, uri: str, keep: int = 3, keep_best: bool = True, create: bool = True):
        self.uri = uri
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
        options = ocp.CheckpointManagerOptions(
            create=create,
            enable_async_checkpointing=True,
            preservation_policy=policies.AnyPreservationPolicy(keepers),
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(uri, item_names=(STATE, META), options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        meta: Mapping[str, Any],
        metrics: Mapping[str, float] | None = None,
    ) -> None:
        """Starts an async save of `step`; returns once the arrays are copied off the devices."""
        meta = {**meta, "format_version": FORMAT_VERSION, "step": int(step)}
        self._manager.save(
            int(step),
            args=ocp.args.Composite(
                **{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}
            ),
            metrics=dict(metrics) if metrics else None,
            force=True,
        )

    def restore_meta(self, step: int | None = None) -> dict[str, Any]:
        step = self._step(step)
        out = self._manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
        return dict(out[META])

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """(state laid out like `target`, meta) of `step` (default: the latest complete one).

        `target` holds arrays or `jax.ShapeDtypeStruct`s with the shardings wanted now, so a
        state saved on 8 devices restores onto 1, or the reverse.
        """
        step = self._step(step)
        abstract = jax.tree.map(_abstract, target)
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{STATE: ocp.args.StandardRestore(abstract), META: ocp.args.JsonRestore()}
            ),
        )
        meta = dict(out[META])
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ConfigError(
                f"checkpoint {self.uri} step {step} has format {meta['format_version']}, newer "
                f"than this pdm-jax reads ({FORMAT_VERSION}); upgrade pdm-jax"
            )
        return out[STATE], meta

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"no complete checkpoint in {self.uri}")
        return int(step)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

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


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ, other than those a resume may change."""
    flat_saved, flat_now = _flatten(saved), _flatten(current)
    keys = sorted(set(flat_saved) | set(flat_now))
    return [
        k
        for k in keys
        if _norm(flat_saved.get(k)) != _norm(flat_now.get(k))
        and not any(k == p or (p.endswith(".") and k.startswith(p)) for p in RESUMABLE_CHANGES)
    ]


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _norm(value: Any) -> Any:
    """JSON round trips turn tuples into lists; compare them as equal."""
    if isinstance(value, tuple | list):
        return [_norm(v) for v in value]
    return value
