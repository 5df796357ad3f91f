"""Split-conformal p10-p90 RUL intervals, fitted on the validation units.

Why: a quantile head trained with the pinball loss on the training units is over-confident on
units it has not seen (the TFT's raw p10-p90 covered 63-76 % of the C-MAPSS test units where it
should cover 80 %), and a point model such as the CNN-BiLSTM has no band at all. Split conformal
prediction (conformalised quantile regression, Romano et al. 2019) moves each side of the band by
the quantile of its misses on held-out units, which gives the nominal coverage when test units
are like the validation ones, whatever the model. The shift is fitted separately per range of
predicted RUL ("Mondrian" bins): errors near failure are a few cycles and errors at the RUL cap
tens, so one shift for all would be too wide at the end of life and too narrow far from it.

The fit is a few numbers (bin edges and two shifts per bin) that travel in the checkpoint's
metadata beside the parameters they were fitted for, so training, `--mode=eval`, batch inference
and the report all draw the same band.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pdm_jax import metrics
from pdm_jax.models.layers import point_index

METHODS = ("conformal", "none")
# Bins of predicted RUL: at most MAX_BINS, each fitted on at least MIN_PER_BIN windows (a 10 %
# tail of fewer than ~20 misses is mostly noise).
MAX_BINS = 4
MIN_PER_BIN = 200


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Per-bin shifts of the p10 and p90 bounds, in cycles, fitted for one set of parameters."""

    interval: tuple[float, float]  # the nominal quantiles of the band (0.1, 0.9)
    edges: tuple[float, ...]  # inner bin edges on the point prediction, ascending
    low: tuple[float, ...]  # cycles taken off the raw lower bound, per bin
    high: tuple[float, ...]  # cycles added to the raw upper bound, per bin
    counts: tuple[int, ...]  # validation windows per bin
    step: int  # the training step of the parameters it was fitted for
    source: str = "validation"

    def bands(
        self, outputs: Any, point: Any, quantiles: Sequence[float], xp: Any = np
    ) -> tuple[Any, Any]:
        """(low, high) RUL bounds for each prediction: the model's own p10/p90 when it has
        them, else the point prediction, each moved by its bin's shift, then held around the
        point (a negative shift narrows a band, and must not narrow it past its own prediction)
        and at or above 0 cycles unless the point itself is below. `xp`: numpy (float64), or
        jax.numpy inside an exported function."""
        point = xp.asarray(point, _wide(xp))
        raw_low, raw_high = raw_bounds(outputs, point, quantiles, xp)
        which = xp.searchsorted(xp.asarray(self.edges, _wide(xp)), point, side="right")
        low = raw_low - xp.asarray(self.low, _wide(xp))[which]
        high = raw_high + xp.asarray(self.high, _wide(xp))[which]
        return around(low, high, point, xp)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "conformal",
            **{k: list(v) if isinstance(v, tuple) else v for k, v in vars(self).items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Calibration | None:
        """The calibration a checkpoint holds; None for checkpoints older than format 2."""
        if not data:
            return None
        return cls(
            interval=(float(data["interval"][0]), float(data["interval"][1])),
            edges=tuple(float(x) for x in data["edges"]),
            low=tuple(float(x) for x in data["low"]),
            high=tuple(float(x) for x in data["high"]),
            counts=tuple(int(x) for x in data["counts"]),
            step=int(data["step"]),
            source=str(data.get("source", "validation")),
        )

    def summary(self) -> dict[str, Any]:
        """The report.json block: what was fitted, on how much, and how far it moved the band."""
        return {
            "method": "conformal",
            "source": self.source,
            "step": self.step,
            "bins": [
                {
                    "from": lo,
                    "to": hi,
                    "windows": n,
                    "low_shift": round(a, 3),
                    "high_shift": round(b, 3),
                }
                for lo, hi, n, a, b in zip(
                    (None, *self.edges),
                    (*self.edges, None),
                    self.counts,
                    self.low,
                    self.high,
                    strict=True,
                )
            ],
        }


def _wide(xp: Any) -> Any:
    """float64 in numpy; jax computes in its default float (float32 unless x64 is enabled)."""
    return np.float64 if xp is np else None


def around(low: Any, high: Any, point: Any, xp: Any = np) -> tuple[Any, Any]:
    """`low <= point <= high`, and neither bound below 0 cycles unless the point is."""
    point = xp.asarray(point, _wide(xp))
    low = xp.minimum(xp.maximum(low, 0.0), point)
    high = xp.maximum(xp.maximum(high, 0.0), point)
    return low, high


def raw_bounds(
    outputs: Any, point: Any, quantiles: Sequence[float], xp: Any = np
) -> tuple[Any, Any]:
    """The model's own p10/p90 outputs held on either side of its point prediction (quantile
    heads trained apart can cross), or (point, point) for a model without them."""
    columns = metrics.interval_columns(quantiles)
    point = xp.asarray(point, _wide(xp))
    if columns is None:
        return point, point
    outputs = xp.asarray(outputs, _wide(xp))
    return xp.minimum(outputs[:, columns[0]], point), xp.maximum(outputs[:, columns[1]], point)


def quantile_table(
    outputs: Any,
    point: Any,
    quantiles: Sequence[float],
    calibrated: Calibration | None = None,
    xp: Any = np,
) -> dict[float, Any]:
    """Every quantile a prediction reports besides its point, ascending: {q: values [N]}.

    The model's own quantiles, with the `calibrated` band in place of (or, for a point model, as)
    its p10/p90. Heads trained apart by the pinball loss can cross, and a calibrated band moves
    only two of them, so the values are then made monotone outwards from the point: each
    quantile below the point's is at most the next one up, each above at least the next one
    down. Training, evaluation, plots and batch inference all take their columns from here, so
    `p10 <= pred <= p90` (and every `pNN` in order) holds wherever a band is shown. With
    `xp=jax.numpy` the same table is computed inside a traced function (an exported model).
    """
    point = xp.asarray(point, _wide(xp))
    outputs = xp.asarray(outputs, _wide(xp))
    centre = point_index(quantiles)
    middle = 0.5 if centre is None else float(quantiles[centre])
    values = {round(float(q), 6): outputs[:, i] for i, q in enumerate(quantiles) if i != centre}
    if calibrated is not None:
        low, high = calibrated.bands(outputs, point, quantiles, xp)
        values[round(calibrated.interval[0], 6)] = low
        values[round(calibrated.interval[1], 6)] = high
    below = sorted((q for q in values if q < middle), reverse=True)
    above = sorted(q for q in values if q >= middle)
    for side, order in ((below, xp.minimum), (above, xp.maximum)):
        previous = point
        for q in side:
            values[q] = previous = order(values[q], previous)
    return dict(sorted(values.items()))


def interval_of(
    table: Mapping[float, np.ndarray], interval: tuple[float, float] = metrics.INTERVAL
) -> tuple[np.ndarray, np.ndarray] | None:
    """The (low, high) columns of `quantile_table`'s result for `interval`, if it has both."""
    keys = [round(float(q), 6) for q in interval]
    if not all(k in table for k in keys):
        return None
    return table[keys[0]], table[keys[1]]


def conformal_quantile(scores: np.ndarray, miss: float) -> float:
    """The shift that leaves at most a `miss` share of held-out scores above it, with the
    finite-sample correction ((n + 1) (1 - miss) / n) of split conformal prediction."""
    scores = np.sort(np.asarray(scores, np.float64))
    n = len(scores)
    rank = min(n, math.ceil((n + 1) * (1.0 - miss)))
    return float(scores[rank - 1])


def bin_edges(point: np.ndarray, bins: int) -> np.ndarray:
    """Inner edges splitting the predictions into `bins` groups of equal count (fewer when many
    predictions are equal, as at the RUL cap)."""
    if bins <= 1:
        return np.zeros(0)
    inner = np.quantile(np.asarray(point, np.float64), np.arange(1, bins) / bins)
    return np.unique(inner)


def fit(
    outputs: np.ndarray,
    point: np.ndarray,
    true: np.ndarray,
    quantiles: Sequence[float],
    step: int,
    interval: tuple[float, float] = metrics.INTERVAL,
    max_bins: int = MAX_BINS,
    cap: float = 0.0,
) -> Calibration | None:
    """Fits the shifts on held-out predictions (`outputs` [N, Q], `point` [N], `true` [N]).

    None when there is nothing to fit on. The lower shift is the conformal quantile of
    (raw low - truth) at the lower tail's share, the upper one of (truth - raw high).

    With a RUL `cap`, the lower shift leaves out windows whose truth sits at the cap. Every
    validation unit contributes all of its early, healthy life there (truth = cap, prediction
    near it: no miss), far more than test units cut part way through their life do, so with
    them the band's lower side closes in on predictions near the cap exactly where the truth
    is often well below it (measured: 9 of 12 FD001 test units predicted near the cap fell
    under their band). A truth at the cap can only miss upwards, so the upper shift keeps them.
    """
    true = np.asarray(true, np.float64)
    keep = np.isfinite(true)
    if not keep.any():
        return None
    point = np.asarray(point, np.float64)[keep]
    raw_low, raw_high = raw_bounds(np.asarray(outputs)[keep], point, quantiles)
    true = true[keep]
    bins = max(1, min(max_bins, len(true) // MIN_PER_BIN))
    edges = bin_edges(point, bins)
    which = np.searchsorted(edges, point, side="right")
    while len(edges):
        empty = np.flatnonzero(np.bincount(which, minlength=len(edges) + 1) == 0)
        if not empty.size:
            break
        edges = np.delete(edges, min(empty[0], len(edges) - 1))  # merge an empty bin away
        which = np.searchsorted(edges, point, side="right")
    low, high, counts = [], [], []
    below_cap = metrics.below_cap(true, cap)
    for b in range(len(edges) + 1):
        sel = which == b
        degrading = sel & below_cap if (sel & below_cap).any() else sel
        low.append(conformal_quantile(raw_low[degrading] - true[degrading], interval[0]))
        high.append(conformal_quantile(true[sel] - raw_high[sel], 1.0 - interval[1]))
        counts.append(int(sel.sum()))
    return Calibration(
        interval=(float(interval[0]), float(interval[1])),
        edges=tuple(float(e) for e in edges),
        low=tuple(low),
        high=tuple(high),
        counts=tuple(counts),
        step=int(step),
    )
