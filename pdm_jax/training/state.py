"""What a run is built from and resumed into: layout, resolved config, data, model, state.

`build` does everything before the first step, for training and `--mode=eval` alike: the
platform layout resolves every 'auto' key, the data is prepared, the model and optimizer state
are placed on the mesh, and process 0 writes config.json and run_info.json. `restore` loads a
checkpoint's step into that state after checking it is the same run (config and data).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, NamedTuple

import jax
import ml_collections
import optax

from pdm_jax import (
    calibration,
    checkpoint,
    configuration,
    hardware,
    jsonio,
    models,
    parallel,
    runinfo,
)
from pdm_jax.data import dataset
from pdm_jax.errors import ConfigError, DataError, PdmError
from pdm_jax.models import layers
from pdm_jax.optim import make_optimizer
from pdm_jax.summaries import read_metrics

log = logging.getLogger(__name__)
RUN_INFO_FILE = "run_info.json"


def resolve(config: Any, layout: hardware.Layout) -> ml_collections.ConfigDict:
    """A copy of the config with every 'auto' field replaced by the layout's decision."""
    values = config.to_dict()
    values["compute"].update(
        dtype=layout.dtype,
        mesh=tuple(layout.mesh_shape),
        xla_flags=" ".join(layout.xla_flags),
        compilation_cache=layout.compilation_cache_dir or "",
    )
    values["train"]["grad_accum"] = int(layout.grad_accum)
    values["model"]["remat"] = tuple(layout.remat)
    values["data"]["num_threads"] = int(layout.data_workers)
    values["compute"]["infer_microbatch"] = int(layout.infer_microbatch)
    resolved = ml_collections.ConfigDict(values)
    return resolved


def snapshot(params: Any) -> Any:
    """A host copy of params: the train step donates its inputs, so a reference kept to the best
    parameters would point at deleted buffers by the next step."""
    return parallel.to_host(params)


def params_digest(params: Any) -> str:
    """sha256 over the parameter bytes: equal digests mean bit-identical models."""
    return models.params_digest(parallel.to_host(params))


class Setup(NamedTuple):
    platform: hardware.Platform
    layout: hardware.Layout
    config: ml_collections.ConfigDict  # every 'auto' resolved
    compiler_options: dict[str, Any]


def setup(config: Any) -> Setup:
    """Detects the platform, decides and logs the layout, applies what it can at run time."""
    detected = hardware.detect(hardware.gather())
    layout = hardware.decide(detected, config)
    log.info("platform and layout:\n%s", hardware.describe(detected, layout))
    options = hardware.apply_runtime(layout)
    return Setup(detected, layout, resolve(config, layout), options)


def surely_empty(uri: str) -> bool:
    """A local store with no step directories: not worth opening an Orbax manager for (one
    opened on nothing leaves a background thread that complains at interpreter exit)."""
    if "://" in uri:
        return False
    return not os.path.isdir(uri) or not any(name.isdigit() for name in os.listdir(uri))


def resume_source(store: checkpoint.CheckpointStore | None, config: Any) -> Any:
    """Where to resume from: this run's own store when it has a step, else `resume_from`."""
    if store is not None and store.latest_step() is not None:
        return store
    if config.checkpoint.resume_from:
        uri = checkpoint.resolve_uri(config.checkpoint.resume_from, "")
        other = None if surely_empty(uri) else checkpoint.CheckpointStore(uri, create=False)
        if other is None or other.latest_step() is None:
            raise ConfigError(
                f"config.checkpoint.resume_from: no complete checkpoint in "
                f"{config.checkpoint.resume_from!r}"
            )
        return other
    return None


def calibrating(config: Any) -> bool:
    """Whether config.train.calibration asks for conformal bands."""
    return config.train.calibration == "conformal"


def saved_calibration(meta: dict[str, Any], config: Any) -> calibration.Calibration | None:
    """The band a checkpoint holds, unless config.train.calibration is now 'none' (a resumable
    change: a run resumed or evaluated with it off reports no band); None before format 2."""
    if not calibrating(config):
        return None
    return calibration.Calibration.from_dict(meta.get("calibration"))


class Restored(NamedTuple):
    """A checkpoint step, in the order `loop.Progressing` takes it."""

    params: Any
    opt_state: Any
    best: dict[str, Any]  # rmse, step, params (a host copy), calibration
    stale: int
    first: int  # the step to run next
    tracking: dict[str, Any] | None  # the MLflow run it logged to (tracking.Tracker.identity)


def restore(
    store: checkpoint.CheckpointStore,
    config: Any,
    prepared: dataset.Prepared,
    batches: Any,
    params: Any,
    opt_state: Any,
) -> Restored:
    """Loads the latest complete step into this run's layout; refuses incompatible ones."""
    meta = store.restore_meta()
    differ = checkpoint.config_differences(meta["config"], config.to_dict())
    if differ:
        raise ConfigError(
            f"checkpoint in {store.uri} was made with a different config; keys that differ: "
            + ", ".join(differ)
        )
    if meta["fingerprint"] != prepared.fingerprint:
        raise DataError(
            f"checkpoint in {store.uri} was trained on different data (fingerprint "
            f"{meta['fingerprint'][:12]}, this data {prepared.fingerprint[:12]})"
        )
    target = {"params": params, "opt_state": opt_state, "best_params": params}
    state, meta = store.restore(target, meta["step"])
    batches.set_state(meta["data"])
    early = meta["early_stopping"]
    best = {
        "rmse": float("inf") if early["best_rmse"] is None else float(early["best_rmse"]),
        "step": int(early["best_step"]),
        "params": snapshot(state["best_params"]),
        "calibration": saved_calibration(meta, config),
    }
    log.info("resumed from %s at step %d (best step %d)", store.uri, meta["step"], best["step"])
    stale, first = int(early["stale"]), int(meta["step"]) + 1
    return Restored(state["params"], state["opt_state"], best, stale, first, meta.get("tracking"))


def truncate_metrics(path: str, last_step: int) -> None:
    """Drops records after `last_step` (a resumed run rewrites them) or all for a fresh run."""
    if not os.path.exists(path):
        return
    records = read_metrics(path)
    # The end-of-run test record is rewritten by the run that finishes.
    keep = [
        json.dumps(r) + "\n"
        for r in records
        if last_step and r.get("step", 0) <= last_step and "test_rmse" not in r
    ]
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        handle.writelines(keep)
    os.replace(tmp, path)


class Run(NamedTuple):
    """Everything built before the first step; shared by training and `--mode=eval`."""

    config: ml_collections.ConfigDict
    layout: hardware.Layout
    prepared: dataset.Prepared
    spec: layers.ModelSpec
    graphdef: Any
    mesh: Any
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    params: Any
    opt_state: Any
    options: dict[str, Any]
    primary: bool
    owner: checkpoint.Ownership | None = None  # released by whoever ends the run


def claim(config: Any, workdir: str) -> checkpoint.Ownership | None:
    """Process 0 claims the workdir and the checkpoint store for the whole run (the other
    processes are the same run, not strangers); every process stops if it cannot."""
    owner, error = None, None
    if jax.process_index() == 0:
        places = [os.path.abspath(workdir), checkpoint.resolve_uri(config.checkpoint.uri, workdir)]
        # A config read back from an older run's config.json may lack the owner keys.
        ckpt = checkpoint.with_added_keys(config.to_dict())["checkpoint"]
        try:
            owner = checkpoint.Ownership(places, ckpt["owner_timeout_s"], ckpt["take_over"]).claim()
        except PdmError as err:
            error = err
    if parallel.agree(error is not None):
        raise error or PdmError("process 0 could not claim the workdir and checkpoint store")
    return owner


def build(config: Any, workdir: str, data_dir: str | None = None, own: bool = True) -> Run:
    """Platform layout, resolved config, data, model and optimizer state on the mesh; writes
    config.json and run_info.json (process 0). `own`: claim the workdir and the store first
    (a writer; `--mode=eval` only reads)."""
    parallel.initialize(config)
    given = config
    detected, layout, config, options = setup(config)
    owner = claim(config, workdir) if own else None
    try:
        return _build(config, given, workdir, data_dir, detected, layout, options)._replace(
            owner=owner
        )
    except BaseException:
        if owner is not None:
            owner.release()
        raise


def _build(
    config: Any,
    given: Any,
    workdir: str,
    data_dir: str | None,
    detected: Any,
    layout: hardware.Layout,
    options: dict[str, Any],
) -> Run:
    primary = jax.process_index() == 0
    resolved = configuration.describe(configuration.changes(given, config))
    log.info("resolved: %s", resolved or "nothing was 'auto'")
    if primary:
        os.makedirs(workdir, exist_ok=True)
        configuration.save(config, workdir)
    prepared = dataset.prepare(config.data, config.seed, data_dir)
    log.info("data: %s", json.dumps(prepared.summary()))
    if primary:
        info = runinfo.collect(hardware.to_dict(detected, layout), prepared.summary())
        jsonio.write_json(os.path.join(workdir, RUN_INFO_FILE), info)
    spec = layers.spec_from_config(
        config.model, len(prepared.inputs), config.data.window, dtype=layout.dtype
    )
    graphdef, host_params = models.init(spec, config.seed)
    count = sum(x.size for x in jax.tree.leaves(host_params))
    if spec.ensemble > 1:
        log.info(
            "model %s: ensemble of %d members, %d parameters each",
            spec.name,
            spec.ensemble,
            count // spec.ensemble,
        )
    else:
        log.info("model %s: %d parameters", spec.name, count)
    mesh = parallel.make_mesh(layout.mesh_shape)
    optimizer, schedule = make_optimizer(config.train, spec.ensemble)
    params = parallel.replicate(host_params, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=parallel.replicated(mesh))(params)
    return Run(
        config,
        layout,
        prepared,
        spec,
        graphdef,
        mesh,
        optimizer,
        schedule,
        params,
        opt_state,
        options,
        primary,
    )


def layout_summary(layout: hardware.Layout) -> dict[str, Any]:
    return {
        "mesh": list(layout.mesh_shape),
        "grad_accum": layout.grad_accum,
        "per_device_batch": layout.per_device_batch,
        "dtype": layout.dtype,
        "infer_microbatch": layout.infer_microbatch,
        "processes": jax.process_count(),
    }
