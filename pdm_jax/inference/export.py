"""A trained model as one self-contained artifact: `model.jaxexport` plus `model.json`.

Why: engines are scored on plant edge boxes, in other teams' services and on servers with only
jax installed. The exported function (a `jax.export` serialisation, lowered for each requested
platform, with a symbolic batch dimension) takes the raw readings as they appear in the user's
file and does everything `scripts/predict.py` does after cutting windows: the per-condition
scaling, the baseline deltas, the model, the target scale, the calibrated band. A consumer needs
jax, numpy and flatbuffers (which `jax.export` reads its format with), nothing of pdm-jax.

Inputs, for a batch of B windows of W rows over the C columns `model.json` lists:
- `raw` [B, W, C] float32: each window's rows, left-padded with zeros when the unit has fewer;
- `length` [B] int32: the unit's rows up to and including the window's last one (the window's
  valid rows are its last min(length, W));
- `head` [B, K, C] float32, only when the model reads baseline inputs (K = data.baseline_cycles):
  the unit's first K rows (zeros past its length). Each row's baseline is the mean of its unit's
  first min(age, K) scaled rows, exactly as training computed it, which one mean per window
  could not give for rows younger than K or for units that change operating condition.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pdm_jax import calibration, models, parallel, runinfo
from pdm_jax.data import features
from pdm_jax.data.table import TIME
from pdm_jax.errors import ConfigError, PdmError, first_line
from pdm_jax.inference.exported import FORMAT_VERSION, META_FILE, MODEL_FILE
from pdm_jax.inference.predictor import Predictor, load, read_saved
from pdm_jax.inference.run import quantile_column
from pdm_jax.models import layers

PLATFORMS = ("cpu", "cuda", "tpu", "rocm")


def raw_columns(scaler: features.Scaler) -> tuple[str, ...]:
    """The columns the exported function reads, in order: settings, sensors, extra inputs."""
    return tuple(dict.fromkeys((*scaler.settings, *scaler.features)))


def offsets(scaler: features.Scaler) -> np.ndarray:
    """Per raw column, a value near its training range (the settings' low end, each feature's
    lowest minimum): what an ONNX model's float32 inputs have subtracted from them."""
    columns = raw_columns(scaler)
    out = np.zeros(len(columns))
    for j, name in enumerate(scaler.features):
        out[columns.index(name)] = scaler.mins[:, j].min()
    for i, name in enumerate(scaler.settings):
        out[columns.index(name)] = scaler.setting_low[i]
    return out


def _centred(scaler: features.Scaler) -> features.Scaler:
    """The scaler for inputs with `offsets` subtracted: the same scaled values, from small
    numbers float32 holds finely."""
    off = offsets(scaler)
    columns = raw_columns(scaler)
    feat = off[[columns.index(c) for c in scaler.features]]
    sets = off[[columns.index(c) for c in scaler.settings]]
    return dataclasses.replace(
        scaler,
        mins=scaler.mins - feat,
        maxs=scaler.maxs - feat,
        setting_low=scaler.setting_low - sets,
    )


def make_function(predictor: Predictor, centred: bool = False) -> Any:
    """fn(raw, length[, head]) -> {output column: [B]}: the whole path after windowing. With
    `centred` (ONNX) the readings come in float32 with `offsets` subtracted, and everything
    runs in float32."""
    scaler, window = predictor.scaler, predictor.window
    cycles, spec = predictor.baseline_cycles, predictor.spec
    if centred:
        scaler = _centred(scaler)
    wide = jnp.float32 if centred else jnp.float64
    columns = raw_columns(scaler)
    settings = [columns.index(c) for c in scaler.settings]
    feats = [columns.index(c) for c in scaler.features]
    levelled = features.levelled_columns(scaler, cycles)
    params = parallel.to_host(predictor.params)
    quantiles, calibrated = spec.quantiles, predictor.calibrated

    def scale(rows: jax.Array) -> jax.Array:
        """In the readings' dtype: float64 as training scaled (C-MAPSS' s_8 and s_13 sit near
        2388 with a range of 0.7, where float32 would move their scaled values by ~5e-4), or
        float32 on centred readings, which are small enough for it."""
        cond = scaler.condition_of(rows[..., settings], jnp)
        return scaler.scale(rows[..., feats], cond, jnp).astype(jnp.float32)

    def fn(raw: jax.Array, length: jax.Array, head: jax.Array | None = None) -> dict:
        age = length[:, None] - window + 1 + jnp.arange(window)[None, :]  # 1-based, per row
        mask = age >= 1
        x = scale(raw)
        if levelled:  # in float64 too, like features.with_baseline
            sums = jnp.cumsum(scale(head)[..., levelled].astype(wide), axis=1)
            count = jnp.clip(age, 1, cycles)
            level = jnp.take_along_axis(sums, (count - 1)[..., None], axis=1) / count[..., None]
            delta = (x[..., levelled].astype(wide) - level).astype(jnp.float32)
            x = jnp.concatenate([x, delta], axis=-1)
        x = jnp.where(mask[..., None], x, jnp.float32(0.0))
        with jax.enable_x64(False):  # the model as it trained: 32-bit defaults throughout
            pred = models.apply(predictor.graphdef, params, {"x": x, "mask": mask})["pred"]
            point = layers.point_prediction(pred, quantiles)
            table = calibration.quantile_table(pred, point, quantiles, calibrated, xp=jnp)
            out = {"rul_pred": point}
            out.update({quantile_column(q): v.astype(jnp.float32) for q, v in table.items()})
        return out

    return fn


def output_names(predictor: Predictor) -> list[str]:
    """`rul_pred` and the band's columns, in `scripts/predict.py`'s order."""
    quantiles = predictor.spec.quantiles
    empty = np.zeros((1, predictor.spec.num_outputs))
    table = calibration.quantile_table(empty, empty[:, 0], quantiles, predictor.calibrated)
    return ["rul_pred", *(quantile_column(q) for q in table)]


def input_specs(predictor: Predictor, batch: Any, reading: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """The exported function's inputs by name: `raw`, `length`, and `head` when the model reads
    baseline inputs; readings of dtype `reading`, `batch` windows (a symbolic dimension)."""
    width, cycles = len(raw_columns(predictor.scaler)), predictor.baseline_cycles
    specs = {
        "raw": jax.ShapeDtypeStruct((batch, predictor.window, width), reading),
        "length": jax.ShapeDtypeStruct((batch,), np.int32),
    }
    if features.levelled_columns(predictor.scaler, cycles):
        specs["head"] = jax.ShapeDtypeStruct((batch, cycles, width), reading)
    return specs


def metadata(predictor: Predictor, platforms: Sequence[str], outputs: Sequence[str]) -> dict:
    """model.json: what a consumer needs to cut windows and read the outputs."""
    data = predictor.config.data
    inputs = list(input_specs(predictor, 1, np.float64))
    return {
        "format_version": FORMAT_VERSION,
        "model": predictor.spec.name,
        # As the user's file names them: the age input is the file's time column.
        "columns": [
            predictor.columns.time if c == TIME else c for c in raw_columns(predictor.scaler)
        ],
        "settings": list(predictor.scaler.settings),
        "unit_column": predictor.columns.unit,
        "time_column": predictor.columns.time,
        "known_columns": sorted(predictor.columns.known),
        "nan_policy": data.nan_policy,
        "window": predictor.window,
        "baseline_cycles": predictor.baseline_cycles if "head" in inputs else 0,
        "inputs": inputs,
        "outputs": list(outputs),
        "rul_cap": data.rul_cap,
        "intervals": "calibrated" if predictor.calibrated is not None else "raw",
        "platforms": list(platforms),
        "source": {
            "checkpoint": predictor.uri,
            "step": predictor.step,
            "params_step": predictor.params_step,
            "params_sha256": models.params_digest(parallel.to_host(predictor.params)),
        },
        "packages": runinfo.versions(),
    }


FORMATS = ("jax", "onnx")
ONNX_FILE = "model.onnx"


def export(
    checkpoint: str,
    output: str,
    step: str | int = "best",
    platforms: Sequence[str] = ("cpu",),
    intervals: str = "calibrated",
    fmt: str = "jax",
) -> dict[str, Any]:
    """Writes `output/model.jaxexport` (or `model.onnx`, `fmt='onnx'`) and `output/model.json`;
    returns the metadata. Written into a temporary sibling and renamed, so a failure leaves no
    half-written directory."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format: expected one of {FORMATS}, got {fmt!r}")
    platforms = tuple(dict.fromkeys(p.strip().lower() for p in platforms if p.strip()))
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown or not platforms:
        raise ConfigError(f"--platforms: expected some of {', '.join(PLATFORMS)}, got {unknown}")
    if os.path.exists(output) and os.listdir(output):
        raise ConfigError(f"--output: {output} exists and is not empty")
    saved = read_saved(checkpoint, step)
    predictor = load(saved, dtype="float32", microbatch=0, intervals=intervals)
    meta = metadata(predictor, platforms, output_names(predictor))
    if fmt == "onnx":
        files = {ONNX_FILE: _onnx(predictor)}
        meta.update(format="onnx", platforms=[], offsets=offsets(predictor.scaler).tolist())
    else:
        files = {MODEL_FILE: _jax_export(predictor, platforms)}
    files[META_FILE] = json.dumps(meta, indent=2, default=str).encode()
    _write_all(output, files)
    return meta


def _jax_export(predictor: Predictor, platforms: tuple[str, ...]) -> bytes:
    fn = make_function(predictor)
    try:
        with jax.enable_x64(True):  # raw readings in float64, as the file holds them
            (batch,) = jax.export.symbolic_shape("b")
            args = input_specs(predictor, batch, np.float64).values()
            exported = jax.export.export(jax.jit(fn), platforms=platforms)(*args)
        return exported.serialize()
    except PdmError:
        raise
    except Exception as err:
        raise ConfigError(
            f"--platforms={','.join(platforms)}: cannot export ({first_line(err)})"
        ) from err


def _onnx(predictor: Predictor) -> bytes:
    """The centred float32 function through jax2onnx (extra `[onnx]`), batch dimension 'B'."""
    try:
        from jax2onnx import to_onnx
    except ImportError:
        raise ConfigError('--format=onnx needs jax2onnx: pip install "pdm-jax[onnx]"') from None
    fn = make_function(predictor, centred=True)
    specs = input_specs(predictor, "B", np.float32)
    try:
        model = to_onnx(
            fn,
            list(specs.values()),
            input_names=list(specs),
            output_names=sorted(output_names(predictor)),
        )
    except Exception as err:
        raise ConfigError(
            f"--format=onnx: jax2onnx cannot convert the model ({first_line(err)})"
        ) from err
    return model.SerializeToString()


def _write_all(output: str, files: dict[str, bytes]) -> None:
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        for name, blob in files.items():
            with open(os.path.join(staging, name), "wb") as handle:
                handle.write(blob)
        if os.path.isdir(output):
            os.rmdir(output)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
