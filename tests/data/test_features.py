import json

import numpy as np
import pandas as pd
import pytest

from pdm_jax.data import cmapss, dataset, features, synthetic
from pdm_jax.data.table import RunTable
from pdm_jax.errors import DataError


@pytest.mark.parametrize("subset,regimes", [("FD001", 1), ("FD002", 6), ("FD003", 1), ("FD004", 6)])
def test_operating_conditions_found(subset, regimes, cmapss_dir):
    data = cmapss.load_cmapss(subset, cmapss_dir)
    scaler = features.fit_scaler(data.train, cmapss.INFORMATIVE_SENSORS, "auto")
    assert scaler.num_conditions == regimes
    counts = np.bincount(scaler.conditions(data.test.frame), minlength=regimes)
    assert (counts > 0.1 * len(data.test.frame) / regimes).all()  # test rows land in every regime
    # Training rows of every regime span [-1, 1] per feature (min-max within the regime).
    x = scaler.transform(data.train.frame)
    cond = scaler.conditions(data.train.frame)
    for k in range(regimes):
        rows = x[cond == k]
        assert rows.min() == pytest.approx(-1.0) and rows.max() == pytest.approx(1.0)


def test_condition_scaling_switches(cmapss_dir):
    data = cmapss.load_cmapss("FD002", cmapss_dir)
    assert features.fit_scaler(data.train, cmapss.INFORMATIVE_SENSORS, False).num_conditions == 1
    assert features.fit_scaler(data.train, cmapss.INFORMATIVE_SENSORS, True).num_conditions == 6
    fd1 = cmapss.load_cmapss("FD001")
    assert features.fit_scaler(fd1.train, cmapss.INFORMATIVE_SENSORS, True).num_conditions == 1
    with pytest.raises(DataError, match="condition_scaling"):
        features.fit_scaler(fd1.train, cmapss.INFORMATIVE_SENSORS, "yes")


def test_per_condition_scaling_removes_regime_offsets(cmapss_dir):
    data = cmapss.load_cmapss("FD004", cmapss_dir)
    per_cond = features.fit_scaler(data.train, cmapss.INFORMATIVE_SENSORS, "auto")
    x = per_cond.transform(data.train.frame)
    cond = per_cond.conditions(data.train.frame)
    means = np.stack([x[cond == k].mean(axis=0) for k in range(6)])
    glob = features.fit_scaler(data.train, cmapss.INFORMATIVE_SENSORS, False).transform(
        data.train.frame
    )
    glob_means = np.stack([glob[cond == k].mean(axis=0) for k in range(6)])
    assert means.std(axis=0).mean() < 0.5 * glob_means.std(axis=0).mean()


def _shifted(table: RunTable, amount: float) -> RunTable:
    frame = table.frame.copy()
    frame[list(table.sensors)] += amount
    return RunTable(
        frame, table.settings, table.sensors, table.unit_labels, table.unit_dataset, "x"
    )


def test_scaling_statistics_come_from_training_units_only():
    cfg_data = _synthetic_cfg()
    base = dataset.prepare(cfg_data, seed=0)
    # Move the test data and the validation units far away: the scaler must not change.
    raw = base.raw
    moved = dataset.features.fit_scaler(
        raw.train.select_units(base.train_units), base.scaler.features, "auto"
    )
    np.testing.assert_array_equal(moved.mins, base.scaler.mins)
    test_moved = _shifted(raw.test, 1e6)
    x_test = base.scaler.transform(test_moved.frame)
    assert x_test.min() > 100  # scaled with training statistics, not refitted on test
    val_table = raw.train.select_units(base.val_units)
    val_moved = _shifted(val_table, -1e6)
    train_only = raw.train.select_units(base.train_units)
    refit = features.fit_scaler(train_only, base.scaler.features, "auto")
    np.testing.assert_array_equal(refit.maxs, base.scaler.maxs)
    assert base.scaler.transform(val_moved.frame).max() < -100
    # And the fitted ranges equal the training units' own min/max.
    values = train_only.frame[list(base.scaler.features)].to_numpy()
    np.testing.assert_allclose(base.scaler.mins[0], values.min(axis=0))
    np.testing.assert_allclose(base.scaler.maxs[0], values.max(axis=0))


def _synthetic_cfg():
    from tests.conftest import load_config

    cfg = load_config().data
    cfg.source = "synthetic"
    cfg.synthetic.num_units = 40
    cfg.synthetic.test_units = 20
    return cfg


def test_scaler_round_trips_through_json(cmapss_dir):
    data = cmapss.load_cmapss("FD002", cmapss_dir)
    scaler = features.fit_scaler(data.train, cmapss.INFORMATIVE_SENSORS, "auto")
    restored = features.Scaler.from_dict(json.loads(json.dumps(scaler.to_dict())))
    np.testing.assert_array_equal(
        restored.transform(data.test.frame), scaler.transform(data.test.frame)
    )
    assert restored.features == scaler.features and restored.num_conditions == 6


def test_rul_target_capped():
    data = cmapss.load_cmapss("FD001")
    y = features.rul_target(data.train, 125)
    assert y.max() == 125 and y.min() == 0 and y.dtype == np.float32
    assert features.rul_target(data.train, 0).max() == data.train.frame["rul"].max()


def test_synthetic_multi_condition_found():
    raw = synthetic.generate(num_units=30, num_conditions=6, seed=3)
    scaler = features.fit_scaler(raw.train, raw.train.sensors, "auto")
    assert scaler.num_conditions == 6


def test_scaling_in_row_blocks_is_bitwise_the_whole_table_at_once(cmapss_dir, monkeypatch):
    """Blocks bound preparation memory (a 100k-unit table no longer peaks at ~10x its scaled
    features); they must not change a single bit of the scaler or the features."""
    data = cmapss.load_cmapss("FD004", cmapss_dir)
    monkeypatch.setattr(features, "TRANSFORM_ROWS", 1 << 30)
    whole = features.fit_scaler(data.train, cmapss.INFORMATIVE_SENSORS, "auto")
    x_whole = whole.transform(data.test.frame)
    monkeypatch.setattr(features, "TRANSFORM_ROWS", 997)  # many blocks, a ragged last one
    blocks = features.fit_scaler(data.train, cmapss.INFORMATIVE_SENSORS, "auto")
    assert json.dumps(blocks.to_dict()) == json.dumps(whole.to_dict())
    assert blocks.transform(data.test.frame).tobytes() == x_whole.tobytes()
    frame = data.train.frame
    np.testing.assert_array_equal(blocks.conditions(frame), whole.conditions(frame))


def test_select_units_renumbers_in_the_given_order(cmapss_dir):
    table = cmapss.load_cmapss("FD001", cmapss_dir).train
    for codes in (np.array([3, 7, 8, 40]), np.array([40, 3, 8, 7])):
        picked = table.select_units(codes)
        expected = pd.concat(
            [table.frame[table.frame["unit"] == c].assign(unit=i) for i, c in enumerate(codes)]
        ).reset_index(drop=True)
        pd.testing.assert_frame_equal(picked.frame, expected)
        np.testing.assert_array_equal(picked.unit_labels, table.unit_labels[codes])
