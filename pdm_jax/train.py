"""`train_and_evaluate(config, workdir)`: the training loop, early stopping and the test report.

One readable loop (big_vision style), no callbacks: batches from the grain pipeline, a jitted step
over plain pytrees, evaluation on the validation units every `eval_every` steps with early
stopping on their RMSE, then the best parameters scored on each test unit's last window. The
learning-rate schedule has its own length (`schedule_steps`), independent of `num_steps`.

Not here yet (later issues): data-parallel meshes and platform detection, checkpoints and resume.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np
import optax

from pdm_jax import configuration, jsonio, metrics, models, steps
from pdm_jax.data import dataset
from pdm_jax.data.pipeline import Windows, eval_batches
from pdm_jax.models import layers
from pdm_jax.progress import Progress

log = logging.getLogger(__name__)
EVAL_BATCH = 1024


def resolve_dtype(requested: str) -> str:
    """'auto': float32 on CPU (bf16 measured slower on XLA:CPU), bfloat16 on GPU/TPU."""
    if requested != "auto":
        return requested
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def learning_rate_schedule(train_cfg: Any) -> optax.Schedule:
    """Warm-up then cosine decay over `schedule_steps`, then flat at 1 % of the peak."""
    peak = float(train_cfg.learning_rate)
    warmup = int(train_cfg.warmup_steps)
    decay = max(int(train_cfg.schedule_steps), warmup + 1)
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, decay, end_value=0.01 * peak)


def evaluate(predict: Any, params: Any, windows: Windows) -> dict[str, Any]:
    """Point predictions for every window and their scores against the (capped) truth."""
    preds, truth, units = [], [], []
    for batch in eval_batches(windows, min(EVAL_BATCH, max(len(windows), 1))):
        valid = batch["valid"]
        out = predict(params, steps.as_arrays(batch))
        preds.append(np.asarray(out["point"])[valid])
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
    return jax.device_get(params)


def train_and_evaluate(
    config: Any, workdir: str, data_dir: str | None = None, test: bool = True
) -> dict[str, Any]:
    """Trains, early-stops on validation RMSE, writes metrics.jsonl and report.json."""
    os.makedirs(workdir, exist_ok=True)
    dtype = resolve_dtype(config.compute.dtype)
    log.info("compute dtype: %s (config.compute.dtype=%s)", dtype, config.compute.dtype)
    configuration.save(config, workdir)
    prepared = dataset.prepare(config.data, config.seed, data_dir)
    log.info("data: %s", json.dumps(prepared.summary()))
    spec = layers.spec_from_config(
        config.model, len(prepared.scaler.features), config.data.window, dtype=dtype
    )
    graphdef, params = models.split(models.build(spec, config.seed))
    log.info("model %s: %d parameters", spec.name, sum(x.size for x in jax.tree.leaves(params)))

    train_cfg = config.train
    schedule = learning_rate_schedule(train_cfg)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    opt_state = optimizer.init(params)
    train_step = steps.make_train_step(graphdef, spec, optimizer)
    predict = steps.make_predict_step(graphdef, spec)
    batches = dataset.train_batches(prepared, config)
    per_epoch = batches.order.batches_per_epoch
    num_steps = train_cfg.num_steps or train_cfg.num_epochs * per_epoch
    eval_every = max(int(train_cfg.eval_every), 1)
    key = jax.random.key(config.seed)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(metrics_path):
        os.remove(metrics_path)

    best: dict[str, Any] = {"rmse": float("inf"), "step": 0, "params": snapshot(params)}
    stale = 0
    losses: list[jax.Array] = []
    progress = Progress(num_steps, "steps", f"training {spec.name}")
    start = time.perf_counter()
    step = 0
    for step in range(1, num_steps + 1):
        batch = steps.as_arrays(next(batches))
        params, opt_state, out = train_step(params, opt_state, batch, jax.random.fold_in(key, step))
        losses.append(out["loss"])
        progress.update()
        if step % eval_every and step != num_steps:
            continue
        record = {
            "step": step,
            "epoch": step / per_epoch,
            "lr": float(schedule(step)),
            "loss": float(np.mean(jax.device_get(losses))),
            "elapsed_s": round(time.perf_counter() - start, 2),
        }
        losses = []
        if prepared.val is not None:
            val = evaluate(predict, params, prepared.val)
            record.update(val_rmse=val["rmse"], val_mae=val["mae"])
            if val["rmse"] < best["rmse"]:
                best = {"rmse": val["rmse"], "step": step, "params": snapshot(params)}
                stale = 0
            else:
                stale += 1
        else:
            best = {"rmse": float("nan"), "step": step, "params": snapshot(params)}
        jsonio.append_jsonl(metrics_path, record)
        log.info("step %d: %s", step, json.dumps(record))
        if train_cfg.patience and stale >= train_cfg.patience:
            log.info("early stopping at step %d (best step %d)", step, best["step"])
            break
    progress.close()
    report: dict[str, Any] = {
        "model": spec.name,
        "steps": step,
        "best_step": best["step"],
        "val_rmse": best["rmse"],
        "train_seconds": round(time.perf_counter() - start, 2),
        "data": prepared.summary(),
    }
    if test and prepared.test is not None and np.isfinite(prepared.test.targets).any():
        result = evaluate(predict, best["params"], prepared.test)
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
        log.info("test: %s", json.dumps(report["test"]))
    jsonio.write_json(os.path.join(workdir, "report.json"), report)
    return report
