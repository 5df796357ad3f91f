"""`train_and_evaluate(config, workdir)`: the training loop, early stopping and the test report.

One readable loop (big_vision style), no callbacks but `on_eval` (a search's pruner): the
platform layout decides how the fixed global batch is split over devices, processes and
microbatches; batches come from the grain pipeline; a jitted, sharded step updates replicated
state; the validation units are scored every `eval_every` steps with early stopping on their
RMSE; then the best parameters are scored on each test unit's last window. The learning-rate
schedule has its own length (`schedule_steps`), independent of `num_steps`, so a longer run
continues a shorter one exactly.

Checkpoints (`pdm_jax.checkpoint`) hold everything the loop needs to continue at exactly the
same point: rerunning the same command resumes from the latest complete step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np

from pdm_jax import (
    checkpoint,
    datacheck,
    jsonio,
    parallel,
    prediction,
    preempt,
    resources,
    tracking,
)
from pdm_jax.data import dataset
from pdm_jax.errors import PdmError
from pdm_jax.optim import eval_params
from pdm_jax.progress import Progress
from pdm_jax.summaries import MetricWriter
from pdm_jax.training import evaluation, state
from pdm_jax.training.steps import host_arrays, make_train_step

log = logging.getLogger(__name__)
SYNC_EVERY = 10
# Steps the host may dispatch ahead of the device. Unbounded, the loop runs up to log_every steps
# ahead (it reads the loss only then), and a stop signal's save first waits for all of them:
# 14 s of TFT steps on this CPU, past a 10 s preemption grace.
MAX_IN_FLIGHT = 2


class Halted(Exception):
    """Raised by an `on_eval` hook to end the run here (a search pruning a poor trial)."""


@dataclasses.dataclass
class Progressing:
    """What changes from step to step and a checkpoint must carry to continue exactly."""

    params: Any
    opt_state: Any
    best: dict[str, Any]  # rmse, step, params (a host copy), calibration
    stale: int = 0  # evaluations since the best one
    first: int = 1  # the first step this process runs
    tracking: dict[str, Any] | None = None  # the MLflow run to continue (tracking.Tracker)


@dataclasses.dataclass
class Loop:
    """What stays fixed while the loop runs: the run, its steps, stores and writers."""

    run: state.Run
    workdir: str
    store: checkpoint.CheckpointStore
    batches: Any
    train_step: Any
    predict: Any
    num_steps: int
    per_epoch: int
    writer: MetricWriter | None = None  # opened once resuming has succeeded
    tracker: tracking.Tracker | None = None
    on_eval: Any = None  # (step, selected validation RMSE) -> None; may raise Halted
    start: float = 0.0


def _open(run: state.Run, workdir: str) -> Loop:
    config, layout = run.config, run.layout
    train_step = make_train_step(
        run.graphdef,
        run.spec,
        run.optimizer,
        run.mesh,
        layout.grad_accum,
        config.seed,
        run.options,
        input_noise=float(config.train.input_noise),
    )
    chunk = int(layout.infer_microbatch)
    predict = prediction.make_predict_step(run.graphdef, run.spec, run.mesh, run.options, chunk)
    batches = dataset.train_batches(
        run.prepared, config, host_index=jax.process_index(), host_count=jax.process_count()
    )
    per_epoch = batches.order.batches_per_epoch
    num_steps = config.train.num_steps or config.train.num_epochs * per_epoch
    store = checkpoint.CheckpointStore(
        checkpoint.resolve_uri(config.checkpoint.uri, workdir),
        keep=config.checkpoint.keep,
        keep_best=bool(config.checkpoint.keep_best),
    )
    return Loop(run, workdir, store, batches, train_step, predict, num_steps, per_epoch)


def _start(loop: Loop) -> Progressing:
    """A fresh start, or the state of the step to resume from (this run's store first)."""
    run = loop.run
    best = {"rmse": float("inf"), "step": 0, "params": state.snapshot(run.params)}
    now = Progressing(run.params, run.opt_state, {**best, "calibration": None})
    try:
        source = state.resume_source(loop.store, run.config)
        if source is not None:
            now = Progressing(
                *state.restore(
                    source, run.config, run.prepared, loop.batches, run.params, run.opt_state
                )
            )
            if source is not loop.store:
                source.close()
    except BaseException:
        loop.store.close()  # Orbax's threads must stop before the interpreter does
        raise
    return now


def _save(loop: Loop, now: Progressing, step: int, val_rmse: float | None) -> None:
    run, best = loop.run, now.best
    meta = {
        "data": loop.batches.get_state(),
        "early_stopping": {
            "best_rmse": None if not np.isfinite(best["rmse"]) else best["rmse"],
            "best_step": best["step"],
            "stale": now.stale,
        },
        "seed": run.config.seed,
        "model": run.spec.name,
        "scaler": run.prepared.scaler.to_dict(),
        "config": run.config.to_dict(),
        "fingerprint": run.prepared.fingerprint,
        "calibration": None if best["calibration"] is None else best["calibration"].to_dict(),
        "tracking": loop.tracker.identity() if loop.tracker else now.tracking,
    }
    arrays = {"params": now.params, "opt_state": now.opt_state, "best_params": best["params"]}
    loop.store.save(step, arrays, meta, {"val_rmse": val_rmse} if val_rmse is not None else None)


def _validate(loop: Loop, now: Progressing, step: int) -> dict[str, Any]:
    """Scores the validation units and keeps the best parameters (and their band); returns the
    record's validation fields and, as `selected`, the score selection compares."""
    run = loop.run
    config, current = run.config, eval_params(now.params, now.opt_state)
    if run.prepared.val is None:
        # No validation units: the latest parameters are the best, with no band to fit.
        now.best = {
            "rmse": float("nan"),
            "step": step,
            "params": state.snapshot(current),
            "calibration": None,
        }
        return {}
    chunk = int(run.layout.infer_microbatch)
    val = evaluation.evaluate(loop.predict, current, run.prepared.val, run.mesh, chunk)
    degrading = evaluation.degrading_rmse(val, config.data.rul_cap)
    selected = degrading if config.train.select_on == "degrading" else val["rmse"]
    if selected < now.best["rmse"]:
        now.best = {
            "rmse": selected,
            "step": step,
            "params": state.snapshot(current),
            "calibration": evaluation.fit_calibration(config, run.spec, val, step),
        }
        now.stale = 0
    else:
        now.stale += 1
    fields = {"val_rmse": val["rmse"], "val_mae": val["mae"], "val_rmse_degrading": degrading}
    return {**fields, "selected": selected}


def _train_record(loop: Loop, losses: list[Any], step: int, first: int) -> dict[str, Any]:
    elapsed, steps = time.perf_counter() - loop.start, step - first + 1
    return {
        "epoch": round(step / loop.per_epoch, 3),
        "lr": float(loop.run.schedule(step)),
        "loss": float(np.mean(parallel.to_host(losses))),
        "samples_per_s": round(steps * loop.run.config.train.batch_size / elapsed, 1),
        "steps_per_s": round(steps / elapsed, 3),
        "elapsed_s": round(elapsed, 2),
        **resources.sample(),
    }


def _run_steps(loop: Loop, now: Progressing, stop: preempt.StopSignal) -> int:
    """Steps `now.first`..`num_steps` (or until early stopping or a stop signal); the last step
    run. Saves as `SaveClock` says; logs and evaluates as the config says."""
    run, train_cfg = loop.run, loop.run.config.train
    eval_every, log_every = int(train_cfg.eval_every), int(train_cfg.log_every)
    clock, losses = checkpoint.SaveClock(run.config.checkpoint), []
    progress = Progress(loop.num_steps, "steps", f"training {run.spec.name}", enabled=run.primary)
    progress.count = now.first - 1
    step = now.first - 1
    try:
        for step in range(now.first, loop.num_steps + 1):
            batch = parallel.global_batch(host_arrays(next(loop.batches)), run.mesh)
            now.params, now.opt_state, out = loop.train_step(
                now.params, now.opt_state, batch, np.int32(step)
            )
            losses.append(out["loss"])
            if len(losses) > MAX_IN_FLIGHT:
                losses[-MAX_IN_FLIGHT - 1].block_until_ready()
            last = step == loop.num_steps
            record: dict[str, Any] = {}
            if step % log_every == 0 or step % eval_every == 0 or last:
                record, losses = _train_record(loop, losses, step, now.first), []
                progress.status = (
                    f"epoch {record['epoch']:.1f}, loss {record['loss']:.3f}, "
                    f"{record['samples_per_s']:,.0f} samples/s"
                )
            progress.update()
            val_rmse = None
            if step % eval_every == 0 or last:
                record.update(_validate(loop, now, step))
                val_rmse = record.pop("selected", None)
                record["best_step"] = now.best["step"]
                log.info("step %d: %s", step, json.dumps(record))
            if record:
                loop.writer.write(step, record)
            if loop.on_eval is not None and val_rmse is not None:
                loop.on_eval(step, val_rmse)
            if _checkpoint_and_stop(loop, now, step, val_rmse, clock, stop):
                break
    finally:
        progress.close()
    return step


def _checkpoint_and_stop(
    loop: Loop,
    now: Progressing,
    step: int,
    val_rmse: float | None,
    clock: checkpoint.SaveClock,
    stop: preempt.StopSignal,
) -> bool:
    """Saves when due; True when the loop ends here (early stopping or a stop signal)."""
    patience = loop.run.config.train.patience
    stopping = bool(patience) and now.stale >= patience
    # Signals and the save clock need a collective across processes: check those every
    # SYNC_EVERY steps there, every step on one process (free).
    sync = jax.process_count() == 1 or step % SYNC_EVERY == 0
    owner = loop.run.owner
    if sync and parallel.agree(owner is not None and owner.lost is not None):
        lost = owner.lost if owner is not None else "process 0 lost the run's workdir or store"
        raise PdmError(f"{lost}; this run stopped at step {step} without saving it")
    preempted = sync and stop.agreed(step)
    if clock.due(step, sync) or stopping or preempted or step == loop.num_steps:
        _save(loop, now, step, val_rmse)
        clock.saved()
    if stopping:
        log.info("early stopping at step %d (best step %d)", step, now.best["step"])
    if preempted:
        log.warning("stop signal: saved step %d to %s; rerun to resume", step, loop.store.uri)
    return stopping or preempted


def _report(loop: Loop, now: Progressing, step: int, test: bool) -> dict[str, Any]:
    """report.json's content: what ran, the best step, and the test scores when asked."""
    run, best = loop.run, now.best
    report: dict[str, Any] = {
        "model": run.spec.name,
        "steps": step,
        "best_step": best["step"],
        "val_rmse": best["rmse"],
        "select_on": run.config.train.select_on,
        "train_seconds": round(time.perf_counter() - loop.start, 2),
        "resumed_from_step": now.first - 1,
        "params_sha256": state.params_digest(now.params),
        "layout": state.layout_summary(run.layout),
        "data": run.prepared.summary(),
    }
    if best["calibration"] is not None:
        report["calibration"] = best["calibration"].summary()
    elif state.calibrating(run.config):
        log.info(
            "no calibrated p10-p90 band: %s",
            "no validation units to fit one on (data.val_fraction=0)"
            if run.prepared.val is None
            else "none fitted since this run resumed from a format 1 checkpoint",
        )
    log.info("process %d: params sha256 %s", jax.process_index(), report["params_sha256"])
    if test:
        best_params = parallel.replicate(best["params"], run.mesh)
        chunk = int(run.layout.infer_microbatch)
        scored = evaluation.test_report(
            loop.predict,
            best_params,
            run.prepared,
            run.mesh,
            run.spec.quantiles,
            chunk,
            best["calibration"],
        )
        if scored is not None:
            report.update(scored)
            loop.writer.write(step, {f"test_{k}": v for k, v in report["test"].items()})
            log.info("test: %s", json.dumps(report["test"]))
    return report


def train_and_evaluate(
    config: Any,
    workdir: str,
    data_dir: str | None = None,
    test: bool = True,
    on_eval: Any = None,
) -> dict[str, Any]:
    """Trains, early-stops on validation RMSE, writes metrics.jsonl, tb/, report.json, plots/
    (and the same to MLflow when `tracking.mlflow_uri` is set). `on_eval(step, rmse)` sees each
    validation score (the one selection uses) and may end the run by raising `Halted`. The run
    owns its workdir and checkpoint store until it ends (`checkpoint.Ownership`)."""
    run = state.build(config, workdir, data_dir)
    try:
        return _train(run, workdir, test, on_eval)
    finally:
        if run.owner is not None:
            run.owner.release()


def _train(run: state.Run, workdir: str, test: bool, on_eval: Any) -> dict[str, Any]:
    loop = _open(run, workdir)
    loop.on_eval = on_eval
    now = _start(loop)
    if run.primary:
        loop.tracker = tracking.start(run.config, workdir, now.tracking)
    loop.writer = MetricWriter(
        workdir,
        enabled=run.primary,
        tensorboard=bool(run.config.train.tensorboard),
        sink=loop.tracker,
    )
    status = "FAILED"
    try:
        report = _train_and_report(loop, now, workdir, test)
        status = "KILLED" if report.get("preempted") else "FINISHED"
    except Halted:
        status = "KILLED"
        raise
    finally:
        if loop.tracker is not None:
            loop.tracker.finish(status)
            loop.tracker.close()
    return report


def _train_and_report(loop: Loop, now: Progressing, workdir: str, test: bool) -> dict[str, Any]:
    run = loop.run
    if run.primary:
        state.truncate_metrics(loop.writer.path, now.first - 1)
    loop.writer.text("config", f"```\n{run.config}\n```")
    loop.start = time.perf_counter()
    stop = preempt.StopSignal()
    try:
        step = _run_steps(loop, now, stop)
    finally:
        stop.restore()
        loop.writer.flush()
        loop.store.close()
    if stop.received:
        loop.writer.close()
        return {"preempted": True, "steps": step}
    report = _report(loop, now, step, test)
    loop.writer.close()
    if run.primary:
        jsonio.write_json(os.path.join(workdir, evaluation.REPORT_FILE), report)
    calibrated = now.best["calibration"]
    evaluation.write_plots(run, workdir, report, now.best["params"], test, calibrated)
    return report


def run_mode(mode: str, config: Any, workdir: str, data_dir: str | None = None) -> Any:
    """What `main` runs for `--mode`: train_and_eval, train, eval or data."""
    if mode == "data":
        return datacheck.run(config, workdir, data_dir)
    if mode == "eval":
        return evaluation.evaluate_checkpoint(config, workdir, data_dir)
    return train_and_evaluate(config, workdir, data_dir, test=mode == "train_and_eval")
