"""Predictions for a set of windows: the jitted predict step and the one loop that feeds it.

Evaluation during training, the report's plots and batch inference all run the model over a
`Windows` set in fixed-shape batches (one compile); this module is the single place that does it,
so a change to how batches are fed, sharded or read back reaches all three. The step is a
`jax.jit` of a plain function of (params, inputs) with the graphdef closed over: `nnx.jit`
measured about twice the per-call overhead on a CPU, and plain pytrees are what sharding wants.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from pdm_jax import models, parallel
from pdm_jax.data.pipeline import Windows, eval_batches, host_share
from pdm_jax.models import layers
from pdm_jax.models.layers import ModelSpec

MODEL_INPUTS = ("x", "mask", "static", "known")


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The keys of a data batch the models read."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def as_arrays(batch: dict[str, Any]) -> dict[str, jax.Array]:
    """A host batch's model inputs as single-device arrays."""
    return {k: jnp.asarray(v) for k, v in model_inputs(batch).items()}


def prediction_batch_size(size: int, data_parallel: int, microbatch: int = 0) -> int:
    """`size` rounded up to a multiple of the data-parallel size, and of the per-device chunks
    (`microbatch` each) when it holds more than one chunk per device, so they apply."""
    multiple = max(1, data_parallel) * max(1, microbatch)
    if size <= multiple:
        multiple = max(1, data_parallel)
    return -(-size // multiple) * multiple


def _in_chunks(
    forward: Callable[[dict[str, Any]], Any], inputs: dict[str, Any], parts: int, chunks: int
) -> Any:
    """forward over `chunks` consecutive slices of each of `parts` equal parts of the batch (the
    data-parallel shards), one slice per part at a time: [B] -> [chunks, parts * B/(parts*chunks)]
    rows, `lax.map` over the first axis, and the outputs put back in batch order."""

    def split(x: jax.Array) -> jax.Array:
        x = x.reshape(parts, chunks, -1, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1).reshape(chunks, -1, *x.shape[3:])

    def join(y: jax.Array) -> jax.Array:
        y = y.reshape(chunks, parts, -1, *y.shape[2:])
        return jnp.swapaxes(y, 0, 1).reshape(-1, *y.shape[3:])

    out = jax.lax.map(forward, jax.tree.map(split, inputs))
    return jax.tree.map(join, out)


def make_predict_step(
    graphdef: Any,
    spec: ModelSpec,
    mesh: Mesh | None = None,
    compiler_options: dict[str, Any] | None = None,
    microbatch: int = 0,
) -> Callable[[Any, dict[str, Any]], dict[str, jax.Array]]:
    """(params, batch) -> {"pred": [B, Q] fp32, "point": [B] fp32}; with a mesh the batch is
    split on the data axis and the outputs come back replicated, readable on every process.

    `microbatch` > 0 runs each device's share of the batch as a loop over chunks of that many
    windows (when it divides the share): the same numbers, and on a CPU the intermediates of a
    chunk stay in cache (config.compute.infer_microbatch).
    """
    parts = mesh.shape[parallel.DATA] if mesh is not None else 1

    def forward(params: Any, inputs: dict[str, Any]) -> jax.Array:
        if mesh is not None and parts > 1:
            inputs = jax.lax.with_sharding_constraint(inputs, parallel.batch_sharding(mesh))
        return models.apply(graphdef, params, inputs)["pred"]

    def predict_step(params, batch):
        inputs = model_inputs(batch)
        share = next(iter(inputs.values())).shape[0] // parts
        if microbatch and share > microbatch and share % microbatch == 0:
            pred = _in_chunks(
                lambda chunk: forward(params, chunk), inputs, parts, share // microbatch
            )
        else:
            pred = forward(params, inputs)
        return {"pred": pred, "point": layers.point_prediction(pred, spec.quantiles)}

    options = {"compiler_options": compiler_options} if compiler_options else {}
    if mesh is None:
        return jax.jit(predict_step, **options)
    state, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    return jax.jit(predict_step, in_shardings=(state, data), out_shardings=state, **options)


def _feeder(mesh: Mesh | None, size: int) -> Callable[[dict[str, Any]], dict[str, jax.Array]]:
    """How a host batch reaches the step: whole onto one device without a mesh; split over the
    mesh's devices when they are all this process's; this process's share of every batch, as
    part of a global array, when the mesh spans processes (evaluation on a multi-host run)."""
    if mesh is None:
        return as_arrays
    local = {d.process_index for d in mesh.devices.flat} == {jax.process_index()}
    if local:
        sharding = parallel.batch_sharding(mesh)
        return lambda batch: jax.device_put(model_inputs(batch), sharding)
    share = host_share(size, jax.process_index(), jax.process_count())
    return lambda batch: parallel.global_batch(
        {k: v[share] for k, v in model_inputs(batch).items()}, mesh
    )


def predict_windows(
    step: Callable[[Any, dict[str, jax.Array]], dict[str, jax.Array]],
    params: Any,
    windows: Windows,
    batch_size: int,
    mesh: Mesh | None = None,
    batch_keys: Sequence[str] = (),
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Every output of `step` for every window, in window order, plus the `batch_keys` of the
    data batches (e.g. `y`, `unit`, `mask`), as host arrays.

    Batches have one shape (`batch_size`; the last is padded and its padding dropped). Batch k+1
    is gathered on the host while batch k runs (dispatch is asynchronous), and results are read
    back one batch behind. `on_batch(n)` is told how many windows each batch finished.
    """
    feed = _feeder(mesh, batch_size)
    parts: dict[str, list[np.ndarray]] = {}
    pending: tuple[dict[str, Any], dict[str, Any]] | None = None

    def collect(out: dict[str, Any], batch: dict[str, Any]) -> None:
        valid = batch["valid"]
        host = parallel.to_host(out)
        for key, value in {**host, **{k: batch[k] for k in batch_keys}}.items():
            parts.setdefault(key, []).append(np.asarray(value)[valid])
        if on_batch is not None:
            on_batch(int(valid.sum()))

    for batch in eval_batches(windows, batch_size):
        out = step(params, feed(batch))
        if pending is not None:
            collect(*pending)
        pending = (out, batch)
    if pending is not None:
        collect(*pending)
    return {key: np.concatenate(values) for key, values in parts.items()}
