"""Split-conformal p10-p90 bands (pdm_jax/calibration.py): fitted on one sample of held-out
predictions, they must cover about 80 % of a fresh sample from the same source, a tenth missed
on each side, whether the raw band was too narrow, too wide or (a point model) absent."""

import json

import numpy as np
import pytest

from pdm_jax import calibration

QUANTILES = (0.1, 0.5, 0.9)


def _sample(n: int, seed: int, raw_halfwidth: float = 0.0):
    """Heteroscedastic RUL predictions: errors grow with the RUL, as on C-MAPSS (a few cycles
    near failure, tens at the cap). Outputs are [p10, p50, p90] with the given raw half-width
    relative to each point's noise scale."""
    rng = np.random.default_rng(seed)
    true = rng.uniform(0, 125, n)
    scale = 2.0 + 0.15 * true
    point = true + rng.normal(0, 1, n) * scale + 1.5  # slightly late, as models tend to be
    outputs = np.stack(
        [point - raw_halfwidth * scale, point, point + raw_halfwidth * scale], axis=1
    )
    return outputs, point, true


def _coverage(low, high, true):
    return float(((low <= true) & (true <= high)).mean())


@pytest.mark.parametrize(
    ("quantiles", "raw_halfwidth"),
    [
        ((), 0.0),  # a point model: the band is built from nothing
        (QUANTILES, 0.3),  # over-confident quantiles (raw covers ~24 %)
        (QUANTILES, 3.0),  # over-cautious quantiles (raw covers ~99.7 %)
    ],
)
def test_fitted_band_covers_eighty_percent_of_fresh_units(quantiles, raw_halfwidth):
    fit_out, fit_point, fit_true = _sample(20_000, 0, raw_halfwidth)
    cal = calibration.fit(fit_out, fit_point, fit_true, quantiles, step=300)
    out, point, true = _sample(20_000, 1, raw_halfwidth)
    low, high = cal.bands(out, point, quantiles)
    assert 0.78 <= _coverage(low, high, true) <= 0.82
    assert 0.08 <= float((true < low).mean()) <= 0.12  # a tenth below, a tenth above
    assert 0.08 <= float((true > high).mean()) <= 0.12
    assert (low <= point).all() and (point <= high).all()
    assert (low >= np.minimum(point, 0)).all()  # the floor is 0 cycles unless the point is below
    if quantiles:
        raw_low, raw_high = out[:, 0], out[:, 2]
        raw = _coverage(raw_low, raw_high, true)
        assert raw < 0.5 if raw_halfwidth < 1 else raw > 0.99  # what calibration fixed


def test_bins_keep_bands_narrow_near_failure_and_honest_far_from_it():
    fit_out, fit_point, fit_true = _sample(20_000, 0)
    binned = calibration.fit(fit_out, fit_point, fit_true, (), step=1)
    single = calibration.fit(fit_out, fit_point, fit_true, (), step=1, max_bins=1)
    assert len(binned.edges) == calibration.MAX_BINS - 1 and single.edges == ()
    out, point, true = _sample(20_000, 1)
    near, far = point < 30, point > 95  # bins are by prediction: what is known at use
    for cal, ok_far in ((binned, True), (single, False)):
        low, high = cal.bands(out, point, ())
        far_coverage = _coverage(low[far], high[far], true[far])
        assert (0.75 <= far_coverage <= 0.85) is ok_far  # one shift for all under-covers here
    low, high = binned.bands(out, point, ())
    width = high - low
    assert np.median(width[near]) < 0.5 * np.median(width[far])


def test_finite_sample_quantile_is_conservative():
    scores = np.arange(1.0, 10.0)  # 9 held-out misses
    # ceil((9 + 1) * 0.9) = 9th smallest: with n = 9 a 10 % miss needs the largest score.
    assert calibration.conformal_quantile(scores, 0.1) == 9.0
    assert calibration.conformal_quantile(scores, 0.5) == 5.0


def test_many_equal_predictions_merge_empty_bins():
    true = np.linspace(0, 125, 1000)
    point = np.where(true > 60, 125.0, true)  # most predictions sit at the cap
    cal = calibration.fit(point[:, None], point, true, (), step=7)
    assert len(set(cal.edges)) == len(cal.edges)
    assert all(n > 0 for n in cal.counts) and sum(cal.counts) == 1000


def test_round_trip_through_json_and_absence():
    out, point, true = _sample(2000, 0, 0.5)
    cal = calibration.fit(out, point, true, QUANTILES, step=42)
    back = calibration.Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert back == cal
    assert calibration.Calibration.from_dict(None) is None
    summary = cal.summary()
    assert summary["step"] == 42 and sum(b["windows"] for b in summary["bins"]) == 2000
    assert calibration.fit(out, point, np.full(2000, np.nan), QUANTILES, step=1) is None


def _capped(n: int, seed: int, healthy: float):
    """Validation-like windows: a `healthy` share of early life, truth clamped at the 125 cap
    and predicted near it; the rest degrading, with errors that grow with the RUL."""
    rng = np.random.default_rng(seed)
    true = np.where(rng.uniform(size=n) < healthy, 125.0, rng.uniform(0, 125, n))
    point = np.minimum(true + rng.normal(0, 1, n) * (2.0 + 0.15 * true), 130.0)
    return point[:, None], point, true


def test_windows_at_the_cap_do_not_narrow_the_lower_side():
    """Validation units bring all their healthy life (truth at the cap, predicted there); test
    units cut part way through it mostly do not. The lower shift must come from the degrading
    windows, or units predicted near the cap fall under their band."""
    fit_out, fit_point, fit_true = _capped(20_000, 0, healthy=0.4)
    out, point, true = _capped(20_000, 1, healthy=0.05)  # test-like: few at the cap
    near_cap = point > 110
    coverage = {}
    for cap in (0.0, 125.0):
        cal = calibration.fit(fit_out, fit_point, fit_true, (), step=1, cap=cap)
        low, high = cal.bands(out, point, ())
        coverage[cap] = _coverage(low[near_cap], high[near_cap], true[near_cap])
        overall = _coverage(low, high, true)
    assert coverage[0.0] < 0.7 and coverage[125.0] >= 0.75, coverage
    assert 0.75 <= overall <= 0.9


def test_a_band_always_holds_its_own_prediction():
    """A negative shift (a raw band wider than it needed to be) narrows the band; near failure
    it could pass the point prediction, as it did for FD001 test units predicted at 1-2 cycles."""
    fit_out, fit_point, fit_true = _sample(5000, 0, raw_halfwidth=3.0)
    cal = calibration.fit(fit_out, fit_point, fit_true, QUANTILES, step=1)
    assert min(cal.low) < 0 and min(cal.high) < 0  # the band narrows on both sides
    point = np.array([-2.0, 0.5, 1.6, 60.0, 125.0])
    out = np.stack([point - 0.1, point, point + 0.1], axis=1)  # raw band just around the point
    low, high = cal.bands(out, point, QUANTILES)
    assert (low <= point).all() and (point <= high).all()
    assert (low[1:] >= 0).all() and low[0] == -2.0  # 0 is the floor unless the point is below


def test_quantile_table_is_monotone_through_the_point():
    quantiles = (0.9, 0.02, 0.5, 0.1, 0.98)  # any order, as a config may list them
    point = np.array([50.0, 10.0, 80.0])
    out = np.array(
        [
            [40.0, 45.0, 50.0, 55.0, 70.0],  # p90 below the median, p10 above it
            [12.0, 30.0, 10.0, 11.0, 9.0],  # everything crossed
            [90.0, 70.0, 80.0, 75.0, 95.0],  # in order already: untouched
        ]
    )
    table = calibration.quantile_table(out, point, quantiles)
    assert list(table) == [0.02, 0.1, 0.9, 0.98]
    values = np.stack(list(table.values()), axis=1)
    assert (np.diff(values, axis=1) >= 0).all()
    assert (values[:, :2] <= point[:, None]).all() and (values[:, 2:] >= point[:, None]).all()
    np.testing.assert_array_equal(values[2], [70.0, 75.0, 90.0, 95.0])
    np.testing.assert_array_equal(values[0], [45.0, 50.0, 50.0, 70.0])
    cal = calibration.Calibration((0.1, 0.9), (), (-30.0,), (-30.0,), (10,), step=1)
    table = calibration.quantile_table(out, point, quantiles, cal)
    values = np.stack(list(table.values()), axis=1)  # a narrowed band pulls p02 and p98 in too
    assert (np.diff(values, axis=1) >= 0).all()
    low, high = calibration.interval_of(table)
    np.testing.assert_array_equal(low, point)
    np.testing.assert_array_equal(high, point)


def test_a_point_models_table_is_its_calibrated_band():
    cal = calibration.Calibration((0.1, 0.9), (), (5.0,), (7.0,), (10,), step=1)
    point = np.array([3.0, 100.0])
    table = calibration.quantile_table(point[:, None], point, (), cal)
    assert list(table) == [0.1, 0.9]
    np.testing.assert_array_equal(table[0.1], [0.0, 95.0])
    np.testing.assert_array_equal(table[0.9], [10.0, 107.0])
    assert calibration.quantile_table(point[:, None], point, ()) == {}
    assert calibration.interval_of({}) is None
