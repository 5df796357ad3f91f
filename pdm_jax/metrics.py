"""RUL scores as the C-MAPSS literature reports them: RMSE, MAE and the PHM08 score.

The PHM08 score penalises late predictions (over-estimated RUL, d > 0) more than early ones:
s = sum(exp(-d/13) - 1 if d < 0 else exp(d/10) - 1), d = predicted - true.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# The quantile pair whose interval report.json scores (`coverage_p10_p90`, per-unit p10/p90).
INTERVAL = (0.1, 0.9)


def phm08_penalty(d: np.ndarray) -> np.ndarray:
    """Each error's PHM08 term: the score is their sum, and the report plots draw this curve."""
    d = np.asarray(d, np.float64)
    return np.where(d < 0, np.expm1(-d / 13.0), np.expm1(d / 10.0))


def phm08_score(pred: np.ndarray, true: np.ndarray) -> float:
    return float(phm08_penalty(np.asarray(pred, np.float64) - np.asarray(true, np.float64)).sum())


def interval_columns(
    quantiles: Sequence[float], interval: tuple[float, float] = INTERVAL
) -> tuple[int, int] | None:
    """Output indices of the interval's two quantiles, or None when the model lacks either: a
    (0.05, 0.5, 0.95) model has no p10-p90 interval, and calling its 5-95 one that would lie."""
    found = []
    for q in interval:
        hits = [i for i, have in enumerate(quantiles) if abs(float(have) - q) < 1e-6]
        if not hits:
            return None
        found.append(hits[0])
    return found[0], found[1]


def below_cap(true: np.ndarray, rul_cap: float | None) -> np.ndarray:
    """Mask of truths below the RUL cap (all True without one): the degrading part of a unit's
    life, as opposed to the healthy early life whose capped truth is trivially the cap."""
    true = np.asarray(true, np.float64)
    if not rul_cap:
        return np.ones(len(true), bool)
    return true < float(rul_cap) - 1e-6


def interval_coverage(low: np.ndarray, high: np.ndarray, true: np.ndarray) -> float:
    """Share of truths inside [low, high]: about 0.8 for a calibrated p10-p90 interval."""
    true = np.asarray(true, np.float64)
    if not len(true):
        return float("nan")
    inside = (np.asarray(low, np.float64) <= true) & (true <= np.asarray(high, np.float64))
    return float(inside.mean())


def rul_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """RMSE, MAE, PHM08 score and count over paired predictions and truths."""
    pred = np.asarray(pred, np.float64)
    true = np.asarray(true, np.float64)
    err = pred - true
    return {
        "rmse": float(np.sqrt(np.mean(err**2))) if len(err) else float("nan"),
        "mae": float(np.mean(np.abs(err))) if len(err) else float("nan"),
        "phm08": phm08_score(pred, true),
        "count": len(err),
    }
