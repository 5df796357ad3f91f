"""The run's plots: what a reader of report.json would otherwise reconstruct in their head.

`write_plots` turns the report, `metrics.jsonl` and (optionally) per-step predictions and the
TFT's interpretability outputs into PNGs under `<workdir>/plots/`, with fixed names so scripts
and people find them:

- `pred_vs_true.png`: each test unit's predicted vs true RUL (sorted by truth), p10-p90 band
  (the calibrated one when the run has it, so point models get a band too);
- `error_hist.png`: the errors against the PHM08 penalty, late (costlier) side marked;
- `trajectories.png`: RUL over the life of a few test units, truth vs prediction at every step;
- `tft_explain.png`: the TFT's variable importance and mean attention over the window;
- `curves.png`: training loss and validation RMSE by step.

Figures are `matplotlib.figure.Figure`s drawn on an Agg canvas: no pyplot, so no global state,
no display needed, and nothing here changes the backend of a notebook that imports it. The two
plots the report alone cannot draw get their inputs from the model in `plotdata`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pdm_jax import metrics, summaries

log = logging.getLogger(__name__)

PLOTS_DIR = "plots"
PRED_VS_TRUE = "pred_vs_true.png"
ERROR_HIST = "error_hist.png"
TRAJECTORIES = "trajectories.png"
TFT_EXPLAIN = "tft_explain.png"
CURVES = "curves.png"
DPI = 110
SIZE = (8.0, 5.0)  # inches
LATE = "#c0392b"  # late predictions (d > 0): the costlier side of the PHM08 score
EARLY = "#2471a3"
BAND_ALPHA = 0.25


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """One unit's predictions at every time step (window end), with the capped truth."""

    unit: Any  # the user's unit label
    time: np.ndarray  # [T] cycles
    true: np.ndarray  # [T] capped RUL (NaN where unknown)
    pred: np.ndarray  # [T] point prediction
    low: np.ndarray | None = None  # [T] p10 where the model has quantiles
    high: np.ndarray | None = None  # [T] p90


@dataclasses.dataclass(frozen=True)
class Explanation:
    """The TFT's interpretability outputs, averaged over windows."""

    features: tuple[str, ...]  # input names, in the model's input order
    importance: np.ndarray  # [F] mean variable-selection weight per input
    attention: np.ndarray  # [T, T] mean attention, query step x key step


def _save(fig: Figure, path: str, layout: bool = True) -> None:
    """Renders on an Agg canvas into a temp file, then renames: no half-written PNG. With
    `layout` False the caller has laid the figure out (room kept for a figure legend)."""
    FigureCanvasAgg(fig)
    if layout:
        fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=DPI)
    os.replace(tmp, path)


def _figure(size: tuple[float, float] = SIZE) -> Figure:
    return Figure(figsize=size, dpi=DPI)


def plot_pred_vs_true(report: Mapping[str, Any], path: str) -> None:
    """Test units sorted by true RUL: how far each prediction sits from the truth, and whether
    the p10-p90 band covers it."""
    units = sorted(report["per_unit"], key=lambda u: u["true"])
    x = np.arange(1, len(units) + 1)
    true = np.array([u["true"] for u in units])
    pred = np.array([u["pred"] for u in units])
    fig = _figure()
    ax = fig.add_subplot()
    if all("p10" in u and "p90" in u for u in units):
        low = np.array([u["p10"] for u in units])
        high = np.array([u["p90"] for u in units])
        ax.vlines(x, low, high, color=EARLY, alpha=0.35, linewidth=3, label="p10-p90 interval")
    ax.plot(x, true, "-", color="black", linewidth=1.5, label="true RUL (capped)")
    late = pred > true
    ax.scatter(
        x[~late], pred[~late], s=14, color=EARLY, label="early: predicted below the truth", zorder=3
    )
    ax.scatter(
        x[late], pred[late], s=14, color=LATE, label="late: predicted above the truth", zorder=3
    )
    fig.text(
        0.5,
        0.01,
        "late = predicted RUL above the true RUL: the costly side (the unit fails before the "
        "maintenance it would plan);\nearly = below it: maintenance sooner than needed",
        ha="center",
        va="bottom",
        fontsize=8,
        color="dimgray",
    )
    test = report.get("test", {})
    title = f"{report.get('model', '')} predicted vs true RUL, {len(units)} test units"
    scores = []
    if "rmse" in test:
        scores.append(f"RMSE {test['rmse']:.2f}")
    if "phm08" in test:
        scores.append(f"PHM08 {test['phm08']:.1f}")
    if "coverage_p10_p90" in test:
        scores.append(f"p10-p90 coverage {test['coverage_p10_p90']:.0%}")
    ax.set_title(title.strip() + "\n" + ", ".join(scores), fontsize=10)
    ax.set_xlabel("test unit, sorted by true RUL (rank)")
    ax.set_ylabel("RUL (cycles)")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    _save(fig, path, layout=False)


def plot_error_hist(report: Mapping[str, Any], path: str) -> None:
    """Errors against the PHM08 penalty: the score punishes late predictions exponentially
    harder, so where the histogram's mass sits matters more than its width alone."""
    errors = np.array([u["error"] for u in report["per_unit"]], np.float64)
    span = max(40.0, float(np.abs(errors).max()) if len(errors) else 0.0) * 1.05
    fig = _figure()
    ax = fig.add_subplot()
    ax.axvspan(0, span, color=LATE, alpha=0.07, label="late (d > 0): costlier")
    bins = np.linspace(-span, span, 41)
    ax.hist(errors[errors <= 0], bins=bins, color=EARLY, alpha=0.8, label="early predictions")
    ax.hist(errors[errors > 0], bins=bins, color=LATE, alpha=0.8, label="late predictions")
    ax.axvline(0, color="black", linewidth=1)
    ax.set_xlim(-span, span)
    ax.set_xlabel("error d = predicted - true RUL (cycles)")
    ax.set_ylabel("test units")
    penalty_ax = ax.twinx()
    d = np.linspace(-span, span, 400)
    penalty_ax.plot(d, metrics.phm08_penalty(d), color="dimgray", linestyle="--", linewidth=1.5)
    penalty_ax.set_ylabel("PHM08 penalty s(d)")
    penalty_ax.set_yscale("log")
    penalty_ax.set_ylim(bottom=1e-2)
    # One legend for both axes.
    handles, labels = ax.get_legend_handles_labels()
    (curve,) = penalty_ax.get_lines()
    handles.append(curve)
    labels.append("s(d) = exp(-d/13)-1 (d<0), exp(d/10)-1 (d>=0)")
    ax.legend(handles, labels, loc="upper left", fontsize=8)
    test = report.get("test", {})
    late_share = float((errors > 0).mean()) if len(errors) else float("nan")
    ax.set_title(
        f"Test errors vs the PHM08 penalty (score {test.get('phm08', float('nan')):.1f}, "
        f"{late_share:.0%} late)",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_trajectories(trajectories: Sequence[Trajectory], path: str) -> None:
    """RUL over each unit's life: whether the model tracks degradation, not only the last point.

    The units are `pick_units`' choice, spread from nearest failure to farthest at their last
    cycle; the plot says so, since a reader otherwise assumes the best or the worst were picked.
    """
    cols = 2 if len(trajectories) > 1 else 1
    rows = math.ceil(len(trajectories) / cols)
    fig = _figure((SIZE[0], max(SIZE[1], 2.6 * rows) + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, traj in zip(axes.flat, trajectories, strict=False):
        if traj.low is not None and traj.high is not None:
            ax.fill_between(
                traj.time,
                traj.low,
                traj.high,
                color=EARLY,
                alpha=BAND_ALPHA,
                linewidth=0,
                label="p10-p90",
            )
        ax.plot(traj.time, traj.true, color="black", linewidth=1.5, label="true RUL (capped)")
        ax.plot(traj.time, traj.pred, color=EARLY, linewidth=1.2, label="predicted")
        final = traj.true[-1] if len(traj.true) else float("nan")
        known = f", true RUL {final:.0f} at its last cycle" if np.isfinite(final) else ""
        ax.set_title(f"unit {traj.unit}{known}", fontsize=9)
        ax.set_xlabel("time (cycles)")
        ax.set_ylabel("RUL (cycles)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(trajectories) :]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.suptitle(
        f"{len(trajectories)} test units over time, prediction at every window end\n"
        "units chosen to span the range of true RUL at their last cycle (nearest failure to "
        "farthest), not the best or worst",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    _save(fig, path, layout=False)


def plot_tft_explain(explanation: Explanation, path: str) -> None:
    """Which inputs the TFT selects and which past steps it attends to."""
    fig = _figure((SIZE[0] * 1.25, SIZE[1]))
    bars, heat = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.2]})
    order = np.argsort(explanation.importance)
    names = [explanation.features[i] for i in order]
    bars.barh(names, explanation.importance[order], color=EARLY, label="mean selection weight")
    bars.set_xlabel("mean selection weight (sums to 1)")
    bars.set_ylabel("input")
    bars.set_title("Variable importance", fontsize=10)
    bars.tick_params(axis="y", labelsize=7)
    bars.legend(loc="lower right", fontsize=7)
    t = explanation.attention.shape[0]
    attention, vmax = attention_view(explanation.attention)
    extent = (-t + 0.5, 0.5, 0.5, -t + 0.5)  # steps relative to the window's end (0 = now)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#eeeeee")
    image = heat.imshow(attention, cmap=cmap, vmin=0.0, vmax=vmax, extent=extent, aspect="auto")
    heat.set_xlabel("earlier cycle attended to (cycles before the window's end)")
    heat.set_ylabel("cycle predicting (cycles before the window's end)")
    heat.set_title(
        "Mean attention (heads and windows averaged)\n"
        "each row: the prediction made at that cycle, and how much it draws on\n"
        "each earlier cycle (a row sums to 1); the bottom row (0) is the one the\n"
        "RUL is read from; grey: later cycles, which it cannot see",
        fontsize=8,
    )
    fig.colorbar(
        image,
        ax=heat,
        extend="max" if vmax < np.nanmax(attention) else "neither",
        label="attention weight (scale capped so later rows show)",
    )
    _save(fig, path)


def attention_view(attention: np.ndarray) -> tuple[np.ndarray, float]:
    """The causal attention map with the steps a query cannot see blanked (NaN), and a colour
    cap: the 99th percentile of the weights of the rows that see at least a quarter of the
    window. The first query sees only itself (weight 1) and the next few a handful of steps, so
    scaled to the maximum every row with a real choice to make would be dark."""
    attention = np.asarray(attention, np.float64)
    t = attention.shape[0]
    visible = np.tril(np.ones((t, t), bool))
    shown = np.where(visible, attention, np.nan)
    rows = visible & (np.arange(t)[:, None] >= max(t // 4, 1))
    values = attention[rows] if rows.any() else attention[visible]
    vmax = float(np.percentile(values, 99)) if values.size else 1.0
    return shown, vmax if vmax > 0 else 1.0


def plot_curves(records: Sequence[Mapping[str, Any]], path: str, best_step: int | None) -> None:
    """Loss and validation RMSE by step: did training converge, overfit or stop early."""
    loss = [(r["step"], r["loss"]) for r in records if "loss" in r and "step" in r]
    val = [(r["step"], r["val_rmse"]) for r in records if "val_rmse" in r and "step" in r]
    fig = _figure()
    top, bottom = fig.subplots(2, 1, sharex=True)
    if loss:
        top.plot(*zip(*loss, strict=True), color=EARLY, linewidth=1.2, label="training loss")
        if min(v for _, v in loss) > 0:
            top.set_yscale("log")
    top.set_ylabel("loss (training objective)")
    top.set_title("Training curves", fontsize=10)
    if val:
        bottom.plot(
            *zip(*val, strict=True), color=LATE, marker="o", markersize=3, label="validation RMSE"
        )
    bottom.set_ylabel("RMSE (cycles)")
    bottom.set_xlabel("step")
    for ax in (top, bottom):
        if best_step:
            ax.axvline(best_step, color="gray", linestyle=":", label=f"best step {best_step}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize=8)
    _save(fig, path)


def write_plots(
    workdir: str,
    report: Mapping[str, Any],
    per_step: Sequence[Trajectory] | None = None,
    tft_explain: Explanation | None = None,
) -> list[str]:
    """Writes every plot the inputs allow into `<workdir>/plots/`; returns the paths written.

    A plot whose inputs are missing (no test truth, no metrics, not a TFT) is skipped rather than
    drawn empty, so a file's presence means it shows something.
    """
    out_dir = os.path.join(workdir, PLOTS_DIR)
    os.makedirs(out_dir, exist_ok=True)
    written: list[str] = []

    def draw(name: str, plot: Callable[[str], None]) -> None:
        path = os.path.join(out_dir, name)
        plot(path)
        written.append(path)

    if report.get("per_unit"):
        draw(PRED_VS_TRUE, lambda p: plot_pred_vs_true(report, p))
        draw(ERROR_HIST, lambda p: plot_error_hist(report, p))
    if per_step:
        draw(TRAJECTORIES, lambda p: plot_trajectories(per_step, p))
    if tft_explain is not None:
        draw(TFT_EXPLAIN, lambda p: plot_tft_explain(tft_explain, p))
    records = summaries.read_metrics(os.path.join(workdir, summaries.METRICS_FILE))
    if any("loss" in r or "val_rmse" in r for r in records):
        best = report.get("best_step")
        draw(CURVES, lambda p: plot_curves(records, p, int(best) if best else None))
    return written
