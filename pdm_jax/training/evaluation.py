"""Scores: validation during training, the test report, `--mode=eval`, and the plots' inputs.

Every prediction goes through `prediction.predict_windows`, the one loop shared with the plots
and batch inference. The test report scores each test unit's last window with the best
parameters and, where a band exists, its coverage; bands come from `calibration.quantile_table`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from pdm_jax import calibration, checkpoint, jsonio, metrics, parallel, prediction
from pdm_jax.data import cmapss, dataset
from pdm_jax.data.pipeline import Windows
from pdm_jax.errors import ConfigError
from pdm_jax.training.state import (
    Run,
    build,
    calibrating,
    layout_summary,
    params_digest,
    restore,
    resume_source,
    surely_empty,
)

log = logging.getLogger(__name__)
EVAL_BATCH = 1024
REPORT_FILE = "report.json"


def eval_batch_size(num_windows: int, data_parallel: int, microbatch: int = 0) -> int:
    """Fixed evaluation batch (one compile), a multiple of the data-parallel size, and of the
    prediction chunks (`microbatch` per device) when it holds more than one of them."""
    return prediction.prediction_batch_size(
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
    out = prediction.predict_windows(predict, params, windows, size, mesh, ("y", "unit"))
    pred, true = out["point"], out["y"]
    return {
        "pred": pred,
        "outputs": out["pred"],
        "true": true,
        "unit": out["unit"],
        **metrics.rul_metrics(pred, true),
    }


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
    """The report plots (`pdm_jax.plots`, fed by `pdm_jax.plotdata`) on process 0, when
    `config.train.plots` is on.

    Plots are a convenience: any failure (matplotlib missing, a drawing error) is logged as a
    warning and the run, whose report.json and checkpoints are already written, goes on. With
    `test` False (`--mode=train`) the test units stay unseen: curves, and the TFT's explanation
    on validation windows, only.
    """
    if not run.primary or not run.config.train.plots:
        return []
    try:
        from pdm_jax import plotdata

        test_windows = run.prepared.test if test else None
        model = plotdata.Model(run.graphdef, run.spec, parallel.to_host(params), calibrated)
        files = plotdata.run_plots(
            workdir,
            report,
            model,
            test_windows,
            run.prepared.raw.test.unit_labels if test_windows is not None else (),
            input_labels(run.config.data.source, run.prepared.inputs),
            explain_windows=test_windows if test_windows is not None else run.prepared.val,
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
    run = build(config, workdir, data_dir, own=False)
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
        restored = restore(source, run.config, run.prepared, batches, run.params, run.opt_state)
        best, first = restored.best, restored.first
        source_uri = source.uri
        if source is not own:
            source.close()
    finally:
        if own is not None:
            own.close()
    chunk = int(run.layout.infer_microbatch)
    predict = prediction.make_predict_step(run.graphdef, run.spec, run.mesh, run.options, chunk)
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
