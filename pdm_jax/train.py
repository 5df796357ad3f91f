"""`train_and_evaluate(config, workdir)`: the training loop, early stopping and the test report.

One readable loop (big_vision style), no callbacks: the platform layout decides how the fixed
global batch is split over devices, processes and microbatches; batches come from the grain
pipeline; a jitted, sharded step updates replicated state; the validation units are scored every
`eval_every` steps with early stopping on their RMSE; then the best parameters are scored on each
test unit's last window. The learning-rate schedule has its own length (`schedule_steps`),
independent of `num_steps`, so a longer run continues a shorter one exactly.

Checkpoints (`pdm_jax.checkpoint`) hold everything the loop needs to continue at exactly the
same point: rerunning the same command resumes from the latest complete step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import optax

from pdm_jax import (
    averaging,
    calibration,
    checkpoint,
    configuration,
    jsonio,
    metrics,
    models,
    parallel,
    platform,
    preempt,
    runinfo,
    steps,
)
from pdm_jax.data import cmapss, dataset
from pdm_jax.data.pipeline import Windows, eval_batches, host_share
from pdm_jax.errors import ConfigError, DataError
from pdm_jax.models import layers
from pdm_jax.progress import Progress
from pdm_jax.summaries import MetricWriter, read_metrics

log = logging.getLogger(__name__)
EVAL_BATCH = 1024
REPORT_FILE = "report.json"
SYNC_EVERY = 10
# Steps the host may dispatch ahead of the device. Unbounded, the loop runs up to log_every steps
# ahead (it reads the loss only then), and a stop signal's save first waits for all of them:
# 14 s of TFT steps on this CPU, past a 10 s preemption grace.
MAX_IN_FLIGHT = 2
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


def make_optimizer(
    train_cfg: Any, members: int = 1
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW on the schedule, after global-norm clipping. For an ensemble (`members` > 1,
    parameters stacked on axis 0) the whole chain is vmapped over the members: each is clipped,
    updated and averaged on its own, exactly as if it trained alone."""
    schedule = learning_rate_schedule(train_cfg)
    parts = []
    if train_cfg.get("clip_norm", 1.0):
        parts.append(optax.clip_by_global_norm(float(train_cfg.clip_norm)))
    parts.append(optax.adamw(schedule, weight_decay=float(train_cfg.get("weight_decay", 0.0))))
    if train_cfg.get("ema_decay", 0.0):
        parts.append(averaging.track_average(float(train_cfg.ema_decay)))
    optimizer = optax.chain(*parts)
    if members > 1:
        optimizer = optax.GradientTransformation(
            jax.vmap(optimizer.init), jax.vmap(optimizer.update)
        )
    return optimizer, schedule


def eval_params(params: Any, opt_state: Any) -> Any:
    """The parameters evaluation uses: the Polyak average when train.ema_decay > 0."""
    average = averaging.averaged(opt_state)
    return params if average is None else average


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
    values["compute"]["infer_microbatch"] = int(layout.infer_microbatch)
    resolved = ml_collections.ConfigDict(values)
    return resolved


def eval_batch_size(num_windows: int, data_parallel: int, microbatch: int = 0) -> int:
    """Fixed evaluation batch (one compile), a multiple of the data-parallel size, and of the
    prediction chunks (`microbatch` per device) when it holds more than one of them."""
    return steps.prediction_batch_size(
        min(EVAL_BATCH, max(num_windows, 1)), data_parallel, microbatch
    )


def evaluate(
    predict: Any, params: Any, windows: Windows, mesh: Any | None = None, microbatch: int = 0
) -> dict[str, Any]:
    """Point predictions for every window and their scores against the (capped) truth, plus
    every model output (`outputs` [N, Q]: the quantiles, one column for point models).

    With a mesh, each process feeds its share of every batch and reads back the whole prediction.
    """
    data_parallel = mesh.shape[parallel.DATA] if mesh is not None else 1
    size = eval_batch_size(len(windows), data_parallel, microbatch)
    share = host_share(size, jax.process_index(), jax.process_count())
    preds, outputs, truth, units = [], [], [], []
    for batch in eval_batches(windows, size):
        valid = batch["valid"]
        inputs = steps.model_inputs(batch)
        if mesh is None:
            out = predict(params, steps.as_arrays(inputs))
        else:
            local = {k: v[share] for k, v in inputs.items()}
            out = predict(params, parallel.global_batch(local, mesh))
        preds.append(parallel.to_host(out["point"])[valid])
        outputs.append(parallel.to_host(out["pred"])[valid])
        truth.append(batch["y"][valid])
        units.append(batch["unit"][valid])
    pred, true = np.concatenate(preds), np.concatenate(truth)
    return {
        "pred": pred,
        "outputs": np.concatenate(outputs),
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


def restore(
    store: checkpoint.CheckpointStore,
    config: Any,
    prepared: dataset.Prepared,
    batches: Any,
    params: Any,
    opt_state: Any,
) -> tuple[Any, Any, dict[str, Any], int, int]:
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
    return state["params"], state["opt_state"], best, int(early["stale"]), int(meta["step"]) + 1


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
    layout: platform.Layout
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


def build(config: Any, workdir: str, data_dir: str | None = None) -> Run:
    """Platform layout, resolved config, data, model and optimizer state on the mesh; writes
    config.json and run_info.json (process 0)."""
    parallel.initialize(config)
    given = config
    detected, layout, config, options = setup(config)
    primary = jax.process_index() == 0
    resolved = configuration.describe(configuration.changes(given, config))
    log.info("resolved: %s", resolved or "nothing was 'auto'")
    if primary:
        os.makedirs(workdir, exist_ok=True)
        configuration.save(config, workdir)
    prepared = dataset.prepare(config.data, config.seed, data_dir)
    log.info("data: %s", json.dumps(prepared.summary()))
    if primary:
        info = runinfo.collect(platform.to_dict(detected, layout), prepared.summary())
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


def layout_summary(layout: platform.Layout) -> dict[str, Any]:
    return {
        "mesh": list(layout.mesh_shape),
        "grad_accum": layout.grad_accum,
        "per_device_batch": layout.per_device_batch,
        "dtype": layout.dtype,
        "infer_microbatch": layout.infer_microbatch,
        "processes": jax.process_count(),
    }


def calibrating(config: Any) -> bool:
    """Whether config.train.calibration asks for conformal bands."""
    return config.train.get("calibration", "none") == "conformal"


def saved_calibration(meta: dict[str, Any], config: Any) -> calibration.Calibration | None:
    """The band a checkpoint holds, unless config.train.calibration is now 'none' (a resumable
    change: a run resumed or evaluated with it off reports no band); None before format 2."""
    if not calibrating(config):
        return None
    return calibration.Calibration.from_dict(meta.get("calibration"))


def degrading_rmse(val: dict[str, Any], rul_cap: float | None) -> float:
    """Validation RMSE over the windows whose truth is below the RUL cap.

    Why: every validation unit brings all of its healthy early life (truth at the cap, easy to
    predict), a share of the windows that test units, cut part way through their life, mostly do
    not have (C-MAPSS FD001: ~40 % of validation windows, 11 % of test units). Selecting on these
    windows alone scores what the test scores. Without a cap (or none below it): all windows.
    """
    below = metrics.below_cap(val["true"], rul_cap)
    if below.all() or not below.any():
        return float(val["rmse"])
    return metrics.rul_metrics(val["pred"][below], val["true"][below])["rmse"]


def fit_calibration(
    config: Any, spec: Any, val: dict[str, Any], step: int
) -> calibration.Calibration | None:
    """The conformal band of the parameters `val` scored, when config.train.calibration asks."""
    if not calibrating(config):
        return None
    cap = float(config.data.rul_cap or 0.0)
    return calibration.fit(val["outputs"], val["pred"], val["true"], spec.quantiles, step, cap=cap)


def test_report(
    predict: Any,
    params: Any,
    prepared: dataset.Prepared,
    mesh: Any,
    quantiles: Sequence[float] = (),
    microbatch: int = 0,
    calibrated: calibration.Calibration | None = None,
) -> dict[str, Any] | None:
    """Scores on each test unit's last window and per-unit errors; None without test truth.

    With a band (the `calibrated` one, else p10 and p90 among the model's `quantiles`), also each
    unit's interval and `test.coverage_p10_p90`, the share of units whose truth it covers (0.8 if
    calibrated): a band that looks reasonable on a plot can still be badly over- or
    under-confident. With both, `test.coverage_p10_p90_raw` is the model's own band's.
    """
    if prepared.test is None or not np.isfinite(prepared.test.targets).any():
        return None
    result = evaluate(predict, params, prepared.test, mesh, microbatch)
    labels = prepared.raw.test.unit_labels
    per_unit = [
        {
            "unit": labels[u].item() if hasattr(labels[u], "item") else labels[u],
            "true": float(t),
            "pred": float(p),
            "error": float(p - t),
        }
        for u, t, p in zip(result["unit"], result["true"], result["pred"], strict=True)
    ]
    scores = {k: result[k] for k in ("rmse", "mae", "phm08", "count")}
    outputs, point = result["outputs"], result["pred"]
    band = calibration.interval_of(calibration.quantile_table(outputs, point, quantiles))
    if band is not None:
        scores["coverage_p10_p90"] = metrics.interval_coverage(*band, result["true"])
        if calibrated is not None:
            scores["coverage_p10_p90_raw"] = scores.pop("coverage_p10_p90")
    if calibrated is not None:
        table = calibration.quantile_table(outputs, point, quantiles, calibrated)
        band = calibration.interval_of(table, calibrated.interval)
        scores["coverage_p10_p90"] = metrics.interval_coverage(*band, result["true"])
    if band is not None:
        for row, lo, hi in zip(per_unit, *band, strict=True):
            row.update(p10=float(lo), p90=float(hi))
    return {"test": scores, "per_unit": per_unit}


def input_labels(source: str, names: Sequence[str]) -> tuple[str, ...]:
    """The model's inputs as plots name them: C-MAPSS columns say what they measure."""
    if source == "cmapss":
        return tuple(cmapss.label(n) for n in names)
    return tuple(names)


def write_plots(
    run: Run,
    workdir: str,
    report: dict[str, Any],
    params: Any,
    test: bool = True,
    calibrated: calibration.Calibration | None = None,
) -> list[str]:
    """The report plots (`pdm_jax.report`) on process 0, when `config.train.plots` is on.

    Plots are a convenience: any failure (matplotlib missing, a drawing error) is logged as a
    warning and the run, whose report.json and checkpoints are already written, goes on. With
    `test` False (`--mode=train`) the test units stay unseen: curves, and the TFT's explanation
    on validation windows, only.
    """
    if not run.primary or not run.config.train.get("plots", True):
        return []
    try:
        from pdm_jax import report as plots

        test_windows = run.prepared.test if test else None
        files = plots.run_plots(
            workdir,
            report,
            run.graphdef,
            run.spec,
            parallel.to_host(params),
            test_windows,
            run.prepared.raw.test.unit_labels if test_windows is not None else (),
            input_labels(run.config.data.source, run.prepared.inputs),
            explain_windows=test_windows if test_windows is not None else run.prepared.val,
            calibrated=calibrated,
        )
    except Exception as err:  # never lose a finished run to a plot
        log.warning("plots not written: %s: %s", type(err).__name__, err)
        return []
    log.info("plots written: %s", ", ".join(files) if files else "none (nothing to plot)")
    return files


def evaluate_checkpoint(config: Any, workdir: str, data_dir: str | None = None) -> dict[str, Any]:
    """`--mode=eval`: the best parameters of the latest complete checkpoint (this run's store, or
    `checkpoint.resume_from`) scored on the validation and test units; writes report.json and
    plots/."""
    run = build(config, workdir, data_dir)
    uri = checkpoint.resolve_uri(run.config.checkpoint.uri, workdir)
    own = None if surely_empty(uri) else checkpoint.CheckpointStore(uri, create=False)
    try:
        source = resume_source(own, run.config)
        if source is None:
            raise ConfigError(
                f"--mode=eval: no complete checkpoint in {uri}; train first or set "
                "config.checkpoint.resume_from"
            )
        batches = dataset.train_batches(run.prepared, run.config)
        _, _, best, _, first = restore(
            source, run.config, run.prepared, batches, run.params, run.opt_state
        )
        source_uri = source.uri
        if source is not own:
            source.close()
    finally:
        if own is not None:
            own.close()
    chunk = int(run.layout.infer_microbatch)
    predict = steps.make_predict_step(run.graphdef, run.spec, run.mesh, run.options, chunk)
    params = parallel.replicate(best["params"], run.mesh)
    report: dict[str, Any] = {
        "mode": "eval",
        "model": run.spec.name,
        "checkpoint": source_uri,
        "checkpoint_step": first - 1,
        "best_step": best["step"],
        "params_sha256": params_digest(params),
        "layout": layout_summary(run.layout),
        "data": run.prepared.summary(),
    }
    calibrated = best["calibration"]
    if run.prepared.val is not None:
        val = evaluate(predict, params, run.prepared.val, run.mesh, chunk)
        report["val"] = {k: val[k] for k in ("rmse", "mae", "phm08", "count")}
        if calibrated is None:  # a format 1 checkpoint: fit the band here, as training would have
            calibrated = fit_calibration(run.config, run.spec, val, best["step"])
            if calibrated is not None:
                calibrated = dataclasses.replace(calibrated, source="validation, at --mode=eval")
                log.info("checkpoint holds no interval calibration; fitted one on validation")
    if calibrated is not None:
        report["calibration"] = calibrated.summary()
    scores = test_report(
        predict, params, run.prepared, run.mesh, run.spec.quantiles, chunk, calibrated
    )
    report.update(scores or {})
    if run.primary:
        jsonio.write_json(os.path.join(workdir, REPORT_FILE), report)
    log.info("eval: %s", json.dumps({k: report.get(k) for k in ("val", "test")}))
    write_plots(run, workdir, report, best["params"], calibrated=calibrated)
    return report


def train_and_evaluate(
    config: Any, workdir: str, data_dir: str | None = None, test: bool = True
) -> dict[str, Any]:
    """Trains, early-stops on validation RMSE, writes metrics.jsonl, tb/, report.json, plots/."""
    run = build(config, workdir, data_dir)
    config, layout, prepared, spec, graphdef, mesh = (
        run.config,
        run.layout,
        run.prepared,
        run.spec,
        run.graphdef,
        run.mesh,
    )
    optimizer, schedule, params, opt_state = run.optimizer, run.schedule, run.params, run.opt_state
    primary, options = run.primary, run.options
    train_cfg = config.train
    train_step = steps.make_train_step(
        graphdef,
        spec,
        optimizer,
        mesh,
        layout.grad_accum,
        config.seed,
        options,
        input_noise=float(train_cfg.get("input_noise", 0.0)),
    )
    chunk = int(layout.infer_microbatch)
    predict = steps.make_predict_step(graphdef, spec, mesh, options, chunk)
    batches = dataset.train_batches(
        prepared, config, host_index=jax.process_index(), host_count=jax.process_count()
    )
    per_epoch = batches.order.batches_per_epoch
    num_steps = train_cfg.num_steps or train_cfg.num_epochs * per_epoch
    eval_every, log_every = int(train_cfg.eval_every), int(train_cfg.log_every)
    select_on = train_cfg.get("select_on", "all")
    store = checkpoint.CheckpointStore(
        checkpoint.resolve_uri(config.checkpoint.uri, workdir),
        keep=config.checkpoint.keep,
        keep_best=bool(config.checkpoint.keep_best),
    )
    best: dict[str, Any] = {
        "rmse": float("inf"),
        "step": 0,
        "params": snapshot(params),
        "calibration": None,
    }
    stale, first = 0, 1
    try:
        source = resume_source(store, config)
        if source is not None:
            params, opt_state, best, stale, first = restore(
                source, config, prepared, batches, params, opt_state
            )
            if source is not store:
                source.close()
    except BaseException:
        store.close()  # Orbax's threads must stop before the interpreter does
        raise
    writer = MetricWriter(workdir, enabled=primary, tensorboard=bool(train_cfg.tensorboard))
    if primary:
        truncate_metrics(writer.path, first - 1)
    writer.text("config", f"```\n{config}\n```")

    def save(step: int, val_rmse: float | None = None) -> None:
        state = {"params": params, "opt_state": opt_state, "best_params": best["params"]}
        meta = {
            "data": batches.get_state(),
            "early_stopping": {
                "best_rmse": None if not np.isfinite(best["rmse"]) else best["rmse"],
                "best_step": best["step"],
                "stale": stale,
            },
            "seed": config.seed,
            "model": spec.name,
            "scaler": prepared.scaler.to_dict(),
            "config": config.to_dict(),
            "fingerprint": prepared.fingerprint,
            "calibration": None if best["calibration"] is None else best["calibration"].to_dict(),
        }
        store.save(step, state, meta, {"val_rmse": val_rmse} if val_rmse is not None else None)

    ckpt_cfg = config.checkpoint
    every_steps, every_s = int(ckpt_cfg.every_steps), float(ckpt_cfg.every_minutes) * 60
    last_save = time.monotonic()
    losses: list[jax.Array] = []
    progress = Progress(num_steps, "steps", f"training {spec.name}", enabled=primary)
    progress.count = first - 1
    start = time.perf_counter()
    step = first - 1
    stop = preempt.StopSignal()
    try:
        for step in range(first, num_steps + 1):
            batch = parallel.global_batch(steps.host_arrays(next(batches)), mesh)
            params, opt_state, out = train_step(params, opt_state, batch, np.int32(step))
            losses.append(out["loss"])
            if len(losses) > MAX_IN_FLIGHT:
                losses[-MAX_IN_FLIGHT - 1].block_until_ready()
            record: dict[str, Any] = {}
            if step % log_every == 0 or step % eval_every == 0 or step == num_steps:
                loss = float(np.mean(parallel.to_host(losses)))
                losses = []
                elapsed = time.perf_counter() - start
                record = {
                    "epoch": round(step / per_epoch, 3),
                    "lr": float(schedule(step)),
                    "loss": loss,
                    "samples_per_s": round((step - first + 1) * train_cfg.batch_size / elapsed, 1),
                    "elapsed_s": round(elapsed, 2),
                }
                progress.status = (
                    f"epoch {step / per_epoch:.1f}, loss {loss:.3f}, "
                    f"{record['samples_per_s']:,.0f} samples/s"
                )
            progress.update()
            val_rmse = None
            evaluated = step % eval_every == 0 or step == num_steps
            if evaluated and prepared.val is not None:
                val = evaluate(predict, eval_params(params, opt_state), prepared.val, mesh, chunk)
                degrading = degrading_rmse(val, config.data.rul_cap)
                val_rmse = degrading if select_on == "degrading" else val["rmse"]
                record.update(val_rmse=val["rmse"], val_mae=val["mae"])
                record["val_rmse_degrading"] = degrading
                if val_rmse < best["rmse"]:
                    best = {
                        "rmse": val_rmse,
                        "step": step,
                        "params": snapshot(eval_params(params, opt_state)),
                        "calibration": fit_calibration(config, spec, val, step),
                    }
                    stale = 0
                else:
                    stale += 1
            elif evaluated:
                best = {
                    "rmse": float("nan"),
                    "step": step,
                    "params": snapshot(eval_params(params, opt_state)),
                    "calibration": None,  # no validation units to fit a band on
                }
            if evaluated:
                record["best_step"] = best["step"]
                log.info("step %d: %s", step, json.dumps(record))
            if record:
                writer.write(step, record)
            stopping = bool(train_cfg.patience) and stale >= train_cfg.patience
            # Signals and the save clock need a collective across processes: check those every
            # SYNC_EVERY steps there, every step on one process (free).
            sync = jax.process_count() == 1 or step % SYNC_EVERY == 0
            preempted = sync and stop.agreed(step)
            due = (every_steps and step % every_steps == 0) or (
                sync and every_s and parallel.agree(time.monotonic() - last_save >= every_s)
            )
            if due or stopping or preempted or step == num_steps:
                save(step, val_rmse)
                last_save = time.monotonic()
            if stopping:
                log.info("early stopping at step %d (best step %d)", step, best["step"])
                break
            if preempted:
                log.warning("stop signal: saved step %d to %s; rerun to resume", step, store.uri)
                break
    finally:
        stop.restore()
        progress.close()
        writer.flush()
        store.close()
    if stop.received:
        writer.close()
        return {"preempted": True, "steps": step}
    report: dict[str, Any] = {
        "model": spec.name,
        "steps": step,
        "best_step": best["step"],
        "val_rmse": best["rmse"],
        "select_on": select_on,
        "train_seconds": round(time.perf_counter() - start, 2),
        "resumed_from_step": first - 1,
        "params_sha256": params_digest(params),
        "layout": layout_summary(layout),
        "data": prepared.summary(),
    }
    if best["calibration"] is not None:
        report["calibration"] = best["calibration"].summary()
    elif calibrating(config):
        log.info(
            "no calibrated p10-p90 band: %s",
            "no validation units to fit one on (data.val_fraction=0)"
            if prepared.val is None
            else "none fitted since this run resumed from a format 1 checkpoint",
        )
    log.info("process %d: params sha256 %s", jax.process_index(), report["params_sha256"])
    if test:
        best_params = parallel.replicate(best["params"], mesh)
        scored = test_report(
            predict, best_params, prepared, mesh, spec.quantiles, chunk, best["calibration"]
        )
        if scored is not None:
            report.update(scored)
            writer.write(step, {f"test_{k}": v for k, v in report["test"].items()})
            log.info("test: %s", json.dumps(report["test"]))
    writer.close()
    if primary:
        jsonio.write_json(os.path.join(workdir, REPORT_FILE), report)
    write_plots(run, workdir, report, best["params"], test=test, calibrated=best["calibration"])
    return report
