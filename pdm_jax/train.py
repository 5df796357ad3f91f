"""`train_and_evaluate(config, workdir)`: the training loop, early stopping and the test report.

One readable loop (big_vision style), no callbacks: the platform layout decides how the fixed
global batch is split over devices, processes and microbatches; batches come from the grain
pipeline; a jitted, sharded step updates replicated state; the validation units are scored every
`eval_every` steps with early stopping on their RMSE; then the best parameters are scored on each
test unit's last window. The learning-rate schedule has its own length (`schedule_steps`),
independent of `num_steps`, so a longer run continues a shorter one exactly.

Not here yet (checkpoint issue): saving and resuming.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import optax

from pdm_jax import configuration, jsonio, metrics, models, parallel, platform, runinfo, steps
from pdm_jax.data import dataset
from pdm_jax.data.pipeline import Windows, eval_batches, host_share
from pdm_jax.models import layers
from pdm_jax.progress import Progress
from pdm_jax.summaries import MetricWriter

log = logging.getLogger(__name__)
EVAL_BATCH = 1024
REPORT_FILE = "report.json"
RUN_INFO_FILE = "run_info.json"


def resolve_dtype(requested: str) -> str:
    """'auto' without a layout: float32 on CPU (bf16 measured slower on XLA:CPU), else bf16."""
    if requested != "auto":
        return requested
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def learning_rate_schedule(train_cfg: Any) -> optax.Schedule:
    """Linear warm-up, then cosine or linear decay over `schedule_steps` to 1 % of the peak (flat
    after), or constant."""
    peak = float(train_cfg.learning_rate)
    warmup = int(train_cfg.warmup_steps)
    kind = train_cfg.get("schedule", "cosine")
    if kind == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup]
        )
    decay = max(int(train_cfg.schedule_steps), warmup + 1)
    if kind == "linear":
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, peak, warmup),
                optax.linear_schedule(peak, 0.01 * peak, decay - warmup),
            ],
            [warmup],
        )
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, decay, end_value=0.01 * peak)


def make_optimizer(train_cfg: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW on the schedule, after global-norm clipping."""
    schedule = learning_rate_schedule(train_cfg)
    parts = []
    if train_cfg.get("clip_norm", 1.0):
        parts.append(optax.clip_by_global_norm(float(train_cfg.clip_norm)))
    parts.append(optax.adamw(schedule, weight_decay=float(train_cfg.get("weight_decay", 0.0))))
    return optax.chain(*parts), schedule


def resolve(config: Any, layout: platform.Layout) -> ml_collections.ConfigDict:
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
    resolved = ml_collections.ConfigDict(values)
    return resolved


def eval_batch_size(num_windows: int, data_parallel: int) -> int:
    """Fixed evaluation batch (one compile), a multiple of the data-parallel size."""
    size = min(EVAL_BATCH, max(num_windows, 1))
    return -(-size // data_parallel) * data_parallel


def evaluate(
    predict: Any, params: Any, windows: Windows, mesh: Any | None = None
) -> dict[str, Any]:
    """Point predictions for every window and their scores against the (capped) truth.

    With a mesh, each process feeds its share of every batch and reads back the whole prediction.
    """
    data_parallel = mesh.shape[parallel.DATA] if mesh is not None else 1
    share = host_share(
        eval_batch_size(len(windows), data_parallel), jax.process_index(), jax.process_count()
    )
    preds, truth, units = [], [], []
    for batch in eval_batches(windows, eval_batch_size(len(windows), data_parallel)):
        valid = batch["valid"]
        inputs = steps.model_inputs(batch)
        if mesh is None:
            out = predict(params, steps.as_arrays(inputs))
        else:
            local = {k: v[share] for k, v in inputs.items()}
            out = predict(params, parallel.global_batch(local, mesh))
        preds.append(parallel.to_host(out["point"])[valid])
        truth.append(batch["y"][valid])
        units.append(batch["unit"][valid])
    pred, true = np.concatenate(preds), np.concatenate(truth)
    return {
        "pred": pred,
        "true": true,
        "unit": np.concatenate(units),
        **metrics.rul_metrics(pred, true),
    }


def snapshot(params: Any) -> Any:
    """A host copy of params: the train step donates its inputs, so a reference kept to the best
    parameters would point at deleted buffers by the next step."""
    return parallel.to_host(params)


def params_digest(params: Any) -> str:
    """sha256 over the parameter bytes: equal digests mean bit-identical models."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(parallel.to_host(params)):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


class Setup(NamedTuple):
    platform: platform.Platform
    layout: platform.Layout
    config: ml_collections.ConfigDict  # every 'auto' resolved
    compiler_options: dict[str, Any]


def setup(config: Any) -> Setup:
    """Detects the platform, decides and logs the layout, applies what it can at run time."""
    detected = platform.detect(platform.gather())
    layout = platform.decide(detected, config)
    log.info("platform and layout:\n%s", platform.describe(detected, layout))
    options = platform.apply_runtime(layout)
    return Setup(detected, layout, resolve(config, layout), options)


def train_and_evaluate(
    config: Any, workdir: str, data_dir: str | None = None, test: bool = True
) -> dict[str, Any]:
    """Trains, early-stops on validation RMSE, writes metrics.jsonl, tb/ and report.json."""
    parallel.initialize(config)
    detected, layout, config, options = setup(config)
    primary = jax.process_index() == 0
    if primary:
        os.makedirs(workdir, exist_ok=True)
        configuration.save(config, workdir)
    prepared = dataset.prepare(config.data, config.seed, data_dir)
    log.info("data: %s", json.dumps(prepared.summary()))
    if primary:
        info = runinfo.collect(platform.to_dict(detected, layout), prepared.summary())
        jsonio.write_json(os.path.join(workdir, RUN_INFO_FILE), info)

    spec = layers.spec_from_config(
        config.model, len(prepared.scaler.features), config.data.window, dtype=layout.dtype
    )
    graphdef, host_params = models.split(models.build(spec, config.seed))
    log.info(
        "model %s: %d parameters", spec.name, sum(x.size for x in jax.tree.leaves(host_params))
    )
    mesh = parallel.make_mesh(layout.mesh_shape)
    train_cfg = config.train
    optimizer, schedule = make_optimizer(train_cfg)
    params = parallel.replicate(host_params, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=parallel.replicated(mesh))(params)
    train_step = steps.make_train_step(
        graphdef, spec, optimizer, mesh, layout.grad_accum, config.seed, options
    )
    predict = steps.make_predict_step(graphdef, spec, mesh, options)
    batches = dataset.train_batches(
        prepared, config, host_index=jax.process_index(), host_count=jax.process_count()
    )
    per_epoch = batches.order.batches_per_epoch
    num_steps = train_cfg.num_steps or train_cfg.num_epochs * per_epoch
    eval_every, log_every = int(train_cfg.eval_every), int(train_cfg.log_every)
    writer = MetricWriter(workdir, enabled=primary, tensorboard=bool(train_cfg.tensorboard))
    if primary and os.path.exists(writer.path):
        os.remove(writer.path)
    writer.text("config", f"```\n{config}\n```")

    best: dict[str, Any] = {"rmse": float("inf"), "step": 0, "params": snapshot(params)}
    stale = 0
    losses: list[jax.Array] = []
    progress = Progress(num_steps, "steps", f"training {spec.name}", enabled=primary)
    start = time.perf_counter()
    step = 0
    try:
        for step in range(1, num_steps + 1):
            batch = parallel.global_batch(steps.host_arrays(next(batches)), mesh)
            params, opt_state, out = train_step(params, opt_state, batch, np.int32(step))
            losses.append(out["loss"])
            if step % log_every == 0 or step % eval_every == 0 or step == num_steps:
                loss = float(np.mean(parallel.to_host(losses)))
                losses = []
                elapsed = time.perf_counter() - start
                record = {
                    "epoch": round(step / per_epoch, 3),
                    "lr": float(schedule(step)),
                    "loss": loss,
                    "samples_per_s": round(step * train_cfg.batch_size / elapsed, 1),
                    "elapsed_s": round(elapsed, 2),
                }
                progress.status = f"epoch {step / per_epoch:.1f}, loss {loss:.3f}"
            else:
                record = None
            progress.update()
            if step % eval_every and step != num_steps:
                if record is not None:
                    writer.write(step, record)
                continue
            record = record or {}
            if prepared.val is not None:
                val = evaluate(predict, params, prepared.val, mesh)
                record.update(val_rmse=val["rmse"], val_mae=val["mae"])
                if val["rmse"] < best["rmse"]:
                    best = {"rmse": val["rmse"], "step": step, "params": snapshot(params)}
                    stale = 0
                else:
                    stale += 1
            else:
                best = {"rmse": float("nan"), "step": step, "params": snapshot(params)}
            record["best_step"] = best["step"]
            writer.write(step, record)
            log.info("step %d: %s", step, json.dumps(record))
            if train_cfg.patience and stale >= train_cfg.patience:
                log.info("early stopping at step %d (best step %d)", step, best["step"])
                break
    finally:
        progress.close()
        writer.flush()
    report: dict[str, Any] = {
        "model": spec.name,
        "steps": step,
        "best_step": best["step"],
        "val_rmse": best["rmse"],
        "train_seconds": round(time.perf_counter() - start, 2),
        "params_sha256": params_digest(params),
        "layout": {
            "mesh": list(layout.mesh_shape),
            "grad_accum": layout.grad_accum,
            "per_device_batch": layout.per_device_batch,
            "dtype": layout.dtype,
            "processes": jax.process_count(),
        },
        "data": prepared.summary(),
    }
    log.info("process %d: params sha256 %s", jax.process_index(), report["params_sha256"])
    if test and prepared.test is not None and np.isfinite(prepared.test.targets).any():
        best_params = parallel.replicate(best["params"], mesh)
        result = evaluate(predict, best_params, prepared.test, mesh)
        labels = prepared.raw.test.unit_labels
        report["test"] = {k: result[k] for k in ("rmse", "mae", "phm08", "count")}
        report["per_unit"] = [
            {
                "unit": labels[u].item() if hasattr(labels[u], "item") else labels[u],
                "true": float(t),
                "pred": float(p),
                "error": float(p - t),
            }
            for u, t, p in zip(result["unit"], result["true"], result["pred"], strict=True)
        ]
        writer.write(step, {f"test_{k}": v for k, v in report["test"].items()})
        log.info("test: %s", json.dumps(report["test"]))
    writer.close()
    if primary:
        jsonio.write_json(os.path.join(workdir, REPORT_FILE), report)
    return report
