"""The synthetic source: reproducible, well-formed RunTables whose sensors carry the RUL signal."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pdm_jax.data import synthetic, validate
from pdm_jax.data.table import DATASET, RUL, TIME, UNIT, RawData, RunTable
from pdm_jax.errors import ConfigError

SETTINGS = list(synthetic.SETTINGS)


def _check_table(table: RunTable) -> None:
    """The RunTable invariants every source must meet."""
    frame = table.frame
    assert list(frame.columns) == [UNIT, TIME, DATASET, *table.settings, *table.sensors, RUL]
    assert frame[UNIT].dtype == np.int64
    assert frame[DATASET].dtype == np.int32
    for col in (TIME, *table.settings, *table.sensors, RUL):
        assert frame[col].dtype == np.float64, col
    assert np.isfinite(frame.drop(columns=[UNIT, DATASET]).to_numpy()).all()
    assert (frame[DATASET] == 0).all()
    validate.check_units_and_time(frame, table.name, UNIT, TIME)
    codes = frame[UNIT].to_numpy()
    assert codes[0] == 0 and (np.diff(codes) >= 0).all() and (np.diff(codes) <= 1).all()
    assert codes[-1] == table.num_units - 1
    np.testing.assert_array_equal(table.unit_labels, np.arange(1, table.num_units + 1))
    assert table.unit_labels.dtype == np.int64
    np.testing.assert_array_equal(table.unit_dataset, np.zeros(table.num_units))
    starts, ends = table.unit_bounds()
    times = frame[TIME].to_numpy()
    # Times are 1..n within each unit, so strictly increasing.
    np.testing.assert_array_equal(times[starts], 1.0)
    np.testing.assert_array_equal(times[ends - 1], ends - starts)
    assert (np.diff(times)[np.diff(codes) == 0] == 1.0).all()


def test_train_shapes_and_rul():
    data = synthetic.generate(num_units=50, seed=3, num_sensors=9)
    assert isinstance(data, RawData)
    assert data.test is None
    assert data.dataset_names == ("synthetic",)
    train = data.train
    assert train.name == "synthetic(seed=3)"
    assert train.num_units == 50
    assert train.settings == ("setting_1", "setting_2", "setting_3")
    assert train.sensors == tuple(f"s_{i}" for i in range(1, 10))
    _check_table(train)
    starts, ends = train.unit_bounds()
    lives = ends - starts
    assert train.num_rows == lives.sum()
    assert lives.min() >= 128 and lives.max() <= 362
    assert len(np.unique(lives)) > 10
    frame = train.frame
    last = pd.Series(frame[TIME]).groupby(frame[UNIT]).transform("max")
    np.testing.assert_array_equal(frame[RUL], last - frame[TIME])
    assert (frame[RUL] >= 0).all()
    np.testing.assert_array_equal(frame[RUL].to_numpy()[ends - 1], 0.0)


def test_life_bounds():
    data = synthetic.generate(num_units=200, min_life=20, max_life=25, seed=1)
    starts, ends = data.train.unit_bounds()
    lives = ends - starts
    assert lives.min() >= 20 and lives.max() <= 25
    assert data.train.num_rows == lives.sum()
    fixed = synthetic.generate(num_units=7, min_life=40, max_life=40)
    assert fixed.train.num_rows == 7 * 40


def test_same_seed_same_data():
    kwargs = dict(num_units=30, seed=11, num_conditions=6, test_units=20)
    a = synthetic.generate(**kwargs)
    b = synthetic.generate(**kwargs)
    pd.testing.assert_frame_equal(a.train.frame, b.train.frame)
    pd.testing.assert_frame_equal(a.test.frame, b.test.frame)
    np.testing.assert_array_equal(a.train.unit_labels, b.train.unit_labels)
    assert a.train.name == b.train.name


def test_different_seed_differs():
    a = synthetic.generate(num_units=30, seed=0).train.frame
    b = synthetic.generate(num_units=30, seed=1).train.frame
    assert a.shape != b.shape or not a.equals(b)
    # Even the first rows' sensors differ, not only the lengths.
    assert not np.allclose(a["s_1"].to_numpy()[:100], b["s_1"].to_numpy()[:100])


def test_train_does_not_depend_on_test_units():
    a = synthetic.generate(num_units=20, seed=5)
    b = synthetic.generate(num_units=20, seed=5, test_units=10)
    pd.testing.assert_frame_equal(a.train.frame, b.train.frame)


def test_six_conditions():
    train = synthetic.generate(num_units=40, num_conditions=6, seed=2).train
    _check_table(train)
    settings = train.frame[list(train.settings)].round(2)
    points = settings.drop_duplicates().to_numpy()
    assert len(points) == 6
    # Well separated: every pair of points differs clearly in some setting.
    gaps = np.abs(points[:, None, :] - points[None, :, :]).max(axis=2)
    assert gaps[~np.eye(6, dtype=bool)].min() > 1.0
    # Every regime is visited, and units move between regimes.
    counts = settings.value_counts()
    assert counts.min() > 0.1 * train.num_rows
    regime = settings.groupby(list(train.settings)).ngroup().to_numpy()
    same_unit = np.diff(train.frame[UNIT].to_numpy()) == 0
    assert (np.diff(regime)[same_unit] != 0).mean() > 0.2


def test_one_condition_settings_near_constant():
    train = synthetic.generate(num_units=40, num_conditions=1, seed=2).train
    settings = train.frame[list(train.settings)]
    assert (settings.std() < 0.01).all()
    assert (settings.max() - settings.min() < 0.01).all()
    assert len(settings.round(2).drop_duplicates()) == 1


def test_sensors_track_rul():
    train = synthetic.generate(num_units=60, num_conditions=1, seed=4).train
    frame = train.frame
    corr = np.array([np.corrcoef(frame[s], frame[RUL])[0, 1] for s in train.sensors])
    assert (np.abs(corr) > 0.3).sum() >= len(train.sensors) / 2
    # Both directions occur: some sensors rise with wear (fall with RUL), some fall.
    assert (corr < -0.3).any() and (corr > 0.3).any()


def test_sensors_track_rul_within_condition():
    train = synthetic.generate(num_units=60, num_conditions=6, seed=4).train
    frame = train.frame
    regime = frame[list(train.settings)].round(2).groupby(list(train.settings)).ngroup()
    informative = 0
    for s in train.sensors:
        centred = frame[s] - frame[s].groupby(regime).transform("mean")
        informative += abs(np.corrcoef(centred, frame[RUL])[0, 1]) > 0.3
    assert informative >= len(train.sensors) / 2


def test_noise_scales_sensor_spread():
    quiet = synthetic.generate(num_units=20, seed=6, noise=0.0).train.frame
    loud = synthetic.generate(num_units=20, seed=6, noise=0.1).train.frame
    # Noise-free sensors are smooth in time; noisy ones jump from row to row.
    assert np.abs(np.diff(quiet["s_1"])).mean() < np.abs(np.diff(loud["s_1"])).mean()


def test_test_trajectories():
    data = synthetic.generate(num_units=10, seed=7, test_units=80, num_conditions=6)
    test = data.test
    assert test is not None
    assert test.num_units == 80
    assert test.name != data.train.name
    assert test.settings == data.train.settings and test.sensors == data.train.sensors
    _check_table(test)
    starts, ends = test.unit_bounds()
    rows = ends - starts
    rul = test.frame[RUL].to_numpy()
    assert (rul[ends - 1] > 0).all()
    # RUL counts down by one per row, so every row has truth L - t.
    times = test.frame[TIME].to_numpy()
    np.testing.assert_array_equal(rul + times, np.repeat(rul[ends - 1] + times[ends - 1], rows))
    life = rul[ends - 1] + rows
    assert life.min() >= 128 and life.max() <= 362
    assert rows.min() >= 1
    assert (rows < 30).sum() >= 3
    assert (rows <= 0.9 * life).all()
    assert np.median(rows / life) > 0.2
    # Same operating points as train.
    train_points = {tuple(p) for p in data.train.frame[SETTINGS].round(2).to_numpy()}
    test_points = {tuple(p) for p in test.frame[SETTINGS].round(2).to_numpy()}
    assert test_points <= train_points


@pytest.mark.parametrize("test_units", [50, 51, 200])
def test_short_test_units_exist(test_units):
    test = synthetic.generate(num_units=1, seed=test_units, test_units=test_units).test
    starts, ends = test.unit_bounds()
    assert ((ends - starts) < 30).sum() >= 2


def test_tiny_lives():
    data = synthetic.generate(num_units=5, min_life=2, max_life=2, test_units=5, seed=9)
    _check_table(data.train)
    _check_table(data.test)
    starts, ends = data.test.unit_bounds()
    np.testing.assert_array_equal(ends - starts, 1)
    assert (data.test.frame[RUL] > 0).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_units=0), "num_units"),
        (dict(num_sensors=0), "num_sensors"),
        (dict(num_conditions=0), "num_conditions"),
        (dict(min_life=1), "min_life"),
        (dict(min_life=50, max_life=40), "max_life"),
        (dict(noise=-0.1), "noise"),
        (dict(noise=float("nan")), "noise"),
        (dict(test_units=-1), "test_units"),
        (dict(num_units=2.5), "integer"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        synthetic.generate(**kwargs)


def test_large():
    data = synthetic.generate(num_units=20_000, seed=0)
    starts, ends = data.train.unit_bounds()
    assert data.train.num_units == 20_000
    assert len(starts) == 20_000
    assert data.train.num_rows == (ends - starts).sum()
    assert 20_000 * 128 <= data.train.num_rows <= 20_000 * 362
