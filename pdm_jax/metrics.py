"""RUL scores as the C-MAPSS literature reports them: RMSE, MAE and the PHM08 score.

The PHM08 score penalises late predictions (over-estimated RUL, d > 0) more than early ones:
s = sum(exp(-d/13) - 1 if d < 0 else exp(d/10) - 1), d = predicted - true.
"""

from __future__ import annotations

import numpy as np


def phm08_score(pred: np.ndarray, true: np.ndarray) -> float:
    d = np.asarray(pred, np.float64) - np.asarray(true, np.float64)
    return float(np.where(d < 0, np.expm1(-d / 13.0), np.expm1(d / 10.0)).sum())


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
