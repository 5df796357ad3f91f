import math

import numpy as np
import pytest

from pdm_jax import metrics


def test_phm08_penalises_late_predictions_more():
    # d = pred - true: -13 -> e^1 - 1; +10 -> e^1 - 1; 0 -> 0
    score = metrics.phm08_score(np.array([7.0, 30.0, 5.0]), np.array([20.0, 20.0, 5.0]))
    assert score == pytest.approx(2 * (math.e - 1))
    assert metrics.phm08_score(np.array([30.0]), np.array([20.0])) > metrics.phm08_score(
        np.array([10.0]), np.array([20.0])
    )


def test_rul_metrics():
    out = metrics.rul_metrics(np.array([1.0, 4.0]), np.array([2.0, 2.0]))
    assert out["rmse"] == pytest.approx(math.sqrt((1 + 4) / 2))
    assert out["mae"] == pytest.approx(1.5) and out["count"] == 2
