"""A checkpoint step made ready to predict: what it says about its model (`read_saved`), then its
parameters restored onto the local devices (`load`).

Why two steps: the config, scaler and input columns are plain metadata, cheap to read, so every
input file can be checked against them before any array is restored or compiled.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from pdm_jax import checkpoint, hardware, models, optim, parallel, prediction
from pdm_jax.calibration import Calibration
from pdm_jax.data import cmapss, dataset, features
from pdm_jax.data.table import TIME
from pdm_jax.errors import ConfigError, first_line
from pdm_jax.models import layers

log = logging.getLogger(__name__)

STEP_CHOICES = ("best", "latest")
INTERVALS = ("calibrated", "raw")


@dataclasses.dataclass(frozen=True)
class Columns:
    """The input columns a checkpoint's model reads, and those its training source also had.

    C-MAPSS runs read text files whose time column is 'cycle' whatever config.data.columns says
    (the C-MAPSS reader names it), so that layout is fixed; user-table runs use the config's names.
    """

    unit: str
    time: str
    settings: tuple[str, ...]
    features: tuple[str, ...]
    known: frozenset[str]  # columns the training layout had on purpose: not "extra"

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.unit, self.time, *self.settings, *self.features)))


@dataclasses.dataclass(frozen=True)
class Predictor:
    """A restored model, on a mesh over the local devices, with everything needed to window."""

    uri: str
    step: int  # the checkpoint step the parameters came from
    which: str  # 'best', 'latest' or the step number asked for
    params_step: int  # the training step the parameters are from ('best': best_step)
    config: ml_collections.ConfigDict
    scaler: features.Scaler
    columns: Columns
    spec: layers.ModelSpec
    mesh: Any
    params: Any
    predict: Any
    microbatch: int = 0  # windows per chunk of a batch, per device (0: the batch at once)
    calibrated: Calibration | None = None  # the conformal p10-p90 band of these parameters
    graphdef: Any = None  # the model's structure, for functions of the parameters (export)

    @property
    def window(self) -> int:
        return int(self.config.data.window)

    @property
    def baseline_cycles(self) -> int:
        return int(self.config.data.baseline_cycles)


@dataclasses.dataclass(frozen=True)
class Saved:
    """What a checkpoint step says about its model, read before any array is: enough to check
    inputs against it, so a bad file fails fast."""

    uri: str
    step: int  # the checkpoint step to restore
    which: str | int  # 'best', 'latest' or the step number asked for
    meta: dict[str, Any]
    config: ml_collections.ConfigDict
    scaler: features.Scaler
    columns: Columns


def store_uri(uri: str) -> str:
    """The store a `--checkpoint` names; a run directory means the store its run saved to."""
    if not uri:
        raise ConfigError("--checkpoint: give a checkpoint store or a run directory")
    try:
        resolved = checkpoint.resolve_uri(uri, "")
    except ConfigError as err:  # its message names the config key; here it is the flag
        raise ConfigError(
            f"--checkpoint: {str(err).removeprefix('config.checkpoint.uri: ')}"
        ) from None
    if "://" in resolved:
        return resolved
    if not os.path.exists(resolved):
        raise ConfigError(f"--checkpoint: {uri}: no such checkpoint store or run directory")
    if not os.path.isdir(resolved):
        raise ConfigError(f"--checkpoint: {uri}: expected a directory, found a file")
    store = _run_store(resolved) or resolved
    if "://" in store:
        return store
    # Checked before Orbax opens it: a store over a directory without steps prints a background
    # thread's traceback at exit, after the one-line error.
    if not os.path.isdir(store) or not any(name.isdigit() for name in os.listdir(store)):
        raise ConfigError(f"--checkpoint: no complete checkpoint in {store}")
    return store


def _run_store(workdir: str) -> str | None:
    """A run directory's store: the config.checkpoint.uri its config.json names, else its
    `checkpoints/`; None when `workdir` does not look like a run directory."""
    saved_config = os.path.join(workdir, "config.json")
    if os.path.isfile(saved_config):
        try:
            with open(saved_config) as handle:
                uri = json.load(handle).get("checkpoint", {}).get("uri")
        except (OSError, ValueError, AttributeError):
            uri = None
        if uri:
            return checkpoint.resolve_uri(uri, workdir)
    nested = os.path.join(workdir, "checkpoints")
    return nested if os.path.isdir(nested) else None


def _tuples(value: Any) -> Any:
    """JSON turned the config's tuples into lists; spec hyper-parameters must stay hashable."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def _columns(config: ml_collections.ConfigDict, scaler: features.Scaler) -> Columns:
    data = config.data
    # The model's inputs read from the file: a model fed the unit's age (data.use_time) takes it
    # from the time column, whatever the file calls it.
    read = tuple(f for f in scaler.features if f != TIME)
    if data.source == "cmapss":
        return Columns("unit", "cycle", scaler.settings, read, frozenset(cmapss.COLUMNS))
    cols = data.columns
    known = {cols.unit, cols.time, *scaler.settings, *read, *(cols.ignore or ())}
    known |= {c for c in (cols.failure, cols.rul) if c}
    return Columns(cols.unit, cols.time, scaler.settings, read, frozenset(known))


def _parse_step(step: str | int) -> str | int:
    if isinstance(step, int) and not isinstance(step, bool):
        return step
    text = str(step).strip().lower()
    if text in STEP_CHOICES:
        return text
    if text.isdigit():
        return int(text)
    raise ConfigError(f"--step: expected best, latest or a step number, got {step!r}")


def _mesh(devices: Sequence[Any] | None) -> Any:
    """Local devices only: each process predicts its own files, with no collective to wait on."""
    devices = list(jax.local_devices() if devices is None else devices)
    return parallel.make_mesh((len(devices), 1), devices)


def _open_store(uri: str) -> checkpoint.CheckpointStore:
    try:
        return checkpoint.CheckpointStore(uri, create=False)
    except Exception as err:  # remote stores fail in many library-specific ways
        raise ConfigError(f"--checkpoint: cannot open {uri}: {first_line(err)}") from err


def read_saved(checkpoint_uri: str, step: str | int = "best") -> Saved:
    """The config, scaler and input columns of the step `step` selects (see `load`)."""
    which = _parse_step(step)
    uri = store_uri(checkpoint_uri)
    with _open_store(uri) as store:
        available = store.all_steps()
        if not available:
            raise ConfigError(f"--checkpoint: no complete checkpoint in {uri}")
        if isinstance(which, int) and which not in available:
            raise ConfigError(
                f"--step={which}: no such step in {uri} (steps: "
                f"{', '.join(map(str, sorted(available)))})"
            )
        chosen = which if isinstance(which, int) else max(available)
        meta = store.restore_meta(chosen)
    missing = [k for k in ("config", "scaler") if k not in meta]
    if missing:
        raise ConfigError(
            f"{uri} step {chosen}: checkpoint metadata lacks {', '.join(missing)}; it was not "
            "written by pdm-jax training"
        )
    values = _tuples(checkpoint.with_added_keys(meta["config"]))
    values["model"]["remat"] = ()  # a backward-pass setting: nothing to rematerialise here
    config = ml_collections.ConfigDict(values)
    scaler = features.Scaler.from_dict(meta["scaler"])
    return Saved(uri, chosen, which, meta, config, scaler, _columns(config, scaler))


def load(
    source: str | Saved,
    step: str | int = "best",
    dtype: str | None = None,
    devices: Sequence[Any] | None = None,
    microbatch: int | str = "auto",
    intervals: str = "calibrated",
) -> Predictor:
    """Restores one step's parameters for prediction, replicated over `devices` (default: all
    local ones).

    'best' is the best-by-validation parameters held in the latest step; 'latest' and a number are
    the parameters of that step (their Polyak average when the run used one, as its evaluation
    did). `dtype` overrides the compute dtype the run resolved (e.g. float32 for a bf16 run
    predicted on a CPU). `source` is a checkpoint URI or what `read_saved` returned (then `step` is
    ignored). `microbatch` ('auto': decided for these devices, not the training's) chunks each
    batch as config.compute.infer_microbatch does. `intervals` 'calibrated' draws the p10-p90
    band the run fitted on its validation units for these parameters (the checkpoint's
    `calibration`); 'raw' gives the model's own quantiles only (none for a point model).
    """
    if intervals not in INTERVALS:
        raise ConfigError(f"--intervals: expected one of {INTERVALS}, got {intervals!r}")
    saved = source if isinstance(source, Saved) else read_saved(source, step)
    config, scaler = saved.config, saved.scaler
    compute = dtype or config.compute.dtype
    if compute == "auto":
        compute = optim.resolve_dtype("auto")
    inputs = dataset.input_names(scaler, int(config.data.baseline_cycles))
    spec = layers.spec_from_config(
        config.model, len(inputs), int(config.data.window), dtype=compute
    )
    graphdef, host_params = models.init(spec, int(config.seed))
    mesh = _mesh(devices)
    chunk, why = _microbatch(mesh, spec, microbatch)
    params, params_step, meta = _restore(saved, spec, host_params, mesh)
    calibrated = None
    if intervals == "calibrated":
        calibrated = _calibration(meta, params_step, saved)
    log.info(
        "%s: step %d, %s parameters (from step %d), model %s, %s on %d device(s), "
        "microbatch %d (%s)",
        saved.uri,
        saved.step,
        saved.which,
        params_step,
        spec.name,
        spec.dtype,
        mesh.devices.size,
        chunk,
        why or "set by --infer_microbatch",
    )
    return Predictor(
        uri=saved.uri,
        step=saved.step,
        which=str(saved.which),
        params_step=params_step,
        config=config,
        scaler=scaler,
        columns=saved.columns,
        spec=spec,
        mesh=mesh,
        params=params,
        predict=prediction.make_predict_step(graphdef, spec, mesh, microbatch=chunk),
        microbatch=chunk,
        calibrated=calibrated,
        graphdef=graphdef,
    )


def _microbatch(mesh: Any, spec: layers.ModelSpec, microbatch: int | str) -> tuple[int, str]:
    """The chunk size for the devices predicting, not those the run trained on."""
    try:
        chunk, _, why = hardware.decide_infer_microbatch(
            mesh.devices.flat[0].platform, spec.name, microbatch
        )
    except ConfigError:
        raise ConfigError(
            f"--infer_microbatch: expected 'auto' or an integer >= 0, got {microbatch!r}"
        ) from None
    return chunk, why


def _restore(
    saved: Saved, spec: layers.ModelSpec, host_params: Any, mesh: Any
) -> tuple[Any, int, dict[str, Any]]:
    """(parameters to predict with, the training step they are from, the step's meta)."""
    optimizer, _ = optim.make_optimizer(saved.config.train, spec.ensemble)
    replicated = parallel.replicated(mesh)

    def abstract(x: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated)

    # The whole state as training saved it: restoring a subset is not what the store offers,
    # and 'latest' needs the optimizer state anyway when it holds a parameter average.
    shapes = jax.tree.map(abstract, host_params)
    target = {
        "params": shapes,
        "opt_state": jax.tree.map(abstract, jax.eval_shape(optimizer.init, host_params)),
        "best_params": shapes,
    }
    with _open_store(saved.uri) as store:
        try:
            state, meta = store.restore(target, saved.step)
        except (ValueError, KeyError) as err:  # a tree or shape mismatch in Orbax
            raise ConfigError(
                f"{saved.uri} step {saved.step}: parameters do not match the model its config "
                f"describes ({first_line(err)})"
            ) from err
    if saved.which == "best":
        params_step = int(meta.get("early_stopping", {}).get("best_step") or saved.step)
        return state["best_params"], params_step, meta
    return optim.eval_params(state["params"], state["opt_state"]), saved.step, meta


def _calibration(meta: dict[str, Any], params_step: int, saved: Saved) -> Calibration | None:
    """The checkpoint's band when it was fitted for the parameters restored; else None, said
    once: a band fitted for other parameters would claim a coverage it does not have."""
    fitted = Calibration.from_dict(meta.get("calibration"))
    if fitted is not None and fitted.step == params_step:
        log.info(
            "p10-p90 band: split-conformal, fitted on %s (%d windows) for step %d",
            fitted.source,
            sum(fitted.counts),
            fitted.step,
        )
        return fitted
    if fitted is None:
        why = (
            f"checkpoint format {meta.get('format_version', 0)} holds none (rerun "
            "--mode=eval or train with config.train.calibration='conformal')"
        )
    else:
        why = f"it was fitted for step {fitted.step}'s parameters, not step {params_step}'s"
    log.info("%s: no calibrated p10-p90 band: %s", saved.uri, why)
    return None
