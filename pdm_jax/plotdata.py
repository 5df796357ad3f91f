"""What the plots need from the model itself: predictions at every step of a few test units,
and the TFT's variable-selection weights and attention. `run_plots` runs the model for those,
then has `plots.write_plots` draw everything.

They run on one process, on host parameters, outside any mesh (no collectives), through
`prediction.predict_windows` like every other prediction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from pdm_jax import calibration, models, prediction
from pdm_jax.calibration import Calibration
from pdm_jax.data.pipeline import Windows
from pdm_jax.models import layers
from pdm_jax.plots import Explanation, Trajectory, write_plots

PLOT_BATCH = 256  # fixed batch of the plotting model runs (one compile)
EXPLAIN_WINDOWS = 256  # windows averaged for the TFT's weights: plenty for a stable mean


def model_outputs(graphdef: Any, spec: layers.ModelSpec) -> Callable[..., dict[str, jax.Array]]:
    """(params, inputs) -> {"pred" [B, Q], "point" [B]}, plus the TFT's `variable_weights`
    [B, T, V] and `attention` [B, H, T, T]: one jitted function (one compile) serves both the
    trajectories and the TFT's explanation. Runs outside any mesh, on the plotting process."""
    details = {"details": True} if spec.name == "tft" else {}

    @jax.jit
    def outputs(params: Any, inputs: dict[str, Any]) -> dict[str, jax.Array]:
        out = models.apply(graphdef, params, inputs, **details)
        result = {
            "pred": out["pred"],
            "point": layers.point_prediction(out["pred"], spec.quantiles),
        }
        if details:
            result.update(variable_weights=out["variable_weights"], attention=out["attention"])
        return result

    return outputs


def run_windows(outputs: Callable[..., Any], params: Any, windows: Windows) -> dict[str, Any]:
    """Every output of `outputs` for every window, in order, plus the windows' `mask`; fixed
    batches of PLOT_BATCH, so every call reuses one compiled shape."""
    return prediction.predict_windows(outputs, params, windows, PLOT_BATCH, batch_keys=("mask",))


def pick_units(windows: Windows, count: int = 4) -> np.ndarray:
    """Unit codes spread over the range of final true RUL (near failure to far from it), so the
    trajectories show the model at different stages; by unit order when the truth is unknown."""
    backwards, first = np.unique(windows.row_unit[::-1], return_index=True)
    units, last = backwards, len(windows.row_unit) - 1 - first  # each unit's last row
    final = windows.targets[last]
    order = np.argsort(np.where(np.isfinite(final), final, np.inf), kind="stable")
    picks = np.unique(np.linspace(0, len(order) - 1, min(count, len(order))).round().astype(int))
    return units[order[picks]]


def collect_trajectories(
    outputs: Callable[..., Any],
    params: Any,
    windows: Windows,
    quantiles: Sequence[float],
    unit_labels: Sequence[Any],
    count: int = 4,
    calibrated: Calibration | None = None,
) -> list[Trajectory]:
    """Predictions at every time step (one window ending at each row) of `count` units."""
    if not len(windows.row_unit):
        return []
    chosen = pick_units(windows, count)
    rows = np.concatenate([np.flatnonzero(windows.row_unit == u) for u in chosen])
    out = run_windows(outputs, params, dataclasses.replace(windows, ends=rows))
    table = calibration.quantile_table(out["pred"], out["point"], quantiles, calibrated)
    low, high = calibration.interval_of(table) or (None, None)
    result = []
    for u in chosen:
        sel = windows.row_unit[rows] == u
        label = unit_labels[u]
        result.append(
            Trajectory(
                unit=label.item() if hasattr(label, "item") else label,
                time=windows.row_time[rows][sel],
                true=windows.targets[rows][sel],
                pred=out["point"][sel],
                low=None if low is None else low[sel],
                high=None if high is None else high[sel],
            )
        )
    return result


def explain_tft(
    outputs: Callable[..., Any], params: Any, windows: Windows, feature_names: Sequence[str]
) -> Explanation:
    """Mean variable-selection weights (over unpadded steps) and mean attention (over heads and
    windows) of the first EXPLAIN_WINDOWS windows; `outputs` from `model_outputs` of a TFT."""
    ids = np.arange(min(len(windows), EXPLAIN_WINDOWS))
    out = run_windows(outputs, params, dataclasses.replace(windows, ends=windows.ends[ids]))
    weights = out["variable_weights"].astype(np.float64)  # [B, T, V]
    mask = out["mask"].astype(np.float64)[..., None]  # [B, T, 1]
    importance = (weights * mask).sum(axis=(0, 1)) / max(mask.sum(), 1.0)
    attention = out["attention"].astype(np.float64).mean(axis=(0, 1))  # [T, T]
    names = tuple(feature_names)[: len(importance)]
    names += tuple(f"input {i}" for i in range(len(names), len(importance)))  # known inputs
    return Explanation(features=names, importance=importance, attention=attention)


@dataclasses.dataclass(frozen=True)
class Model:
    """The model the plots run: structure, host parameters and the band fitted for them."""

    graphdef: Any
    spec: layers.ModelSpec
    params: Any  # host arrays
    calibrated: Calibration | None = None


def run_plots(
    workdir: str,
    report: Mapping[str, Any],
    model: Model,
    windows: Windows | None,
    unit_labels: Sequence[Any],
    feature_names: Sequence[str],
    explain_windows: Windows | None = None,
) -> list[str]:
    """Runs the model for the trajectory and TFT plots, then writes every plot.

    `windows` are the test units' (their rows are what count) or None to skip the trajectories;
    `explain_windows` feed the TFT plot (default: `windows`).
    """
    spec, params = model.spec, model.params
    outputs = model_outputs(model.graphdef, spec)
    per_step = None
    if windows is not None:
        per_step = collect_trajectories(
            outputs, params, windows, spec.quantiles, unit_labels, calibrated=model.calibrated
        )
    explanation = None
    source = explain_windows if explain_windows is not None else windows
    if spec.name == "tft" and source is not None and len(source):
        explanation = explain_tft(outputs, params, source, feature_names)
    return write_plots(workdir, report, per_step, explanation)
