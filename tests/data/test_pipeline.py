import dataclasses
import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from pdm_jax import configuration
from pdm_jax.data import cmapss, dataset
from pdm_jax.data.pipeline import BatchOrder, TrainIterator, eval_batches, window_ends
from pdm_jax.errors import ConfigError, DataError
from tests.conftest import REPO, load_config


def _cfg(subset="FD001", **data):
    cfg = load_config()
    cfg.data.subset = subset
    for key, value in data.items():
        cfg.data[key] = value
    return cfg


def test_fd001_window_counts():
    cfg = _cfg(val_fraction=0.0)
    prepared = dataset.prepare(cfg.data, cfg.seed)
    assert len(prepared.train) == 17731  # 20,631 rows - 100 units * 29
    assert prepared.val is None
    assert len(prepared.test) == 100 and prepared.test.num_padded == 0
    truth = np.minimum(cmapss.read_rul(cmapss.EMBEDDED_DIR / "RUL_FD001.txt.gz"), 125)
    batch = prepared.test.gather(np.arange(100))
    np.testing.assert_array_equal(batch["y"], truth.astype(np.float32))
    assert batch["mask"].all()


@pytest.mark.parametrize(
    "subset,train_windows,test_units,padded",
    [
        ("FD002", 53759 - 260 * 20, 259, 0),
        ("FD003", 24720 - 100 * 29, 100, 0),
        ("FD004", 61249 - 249 * 29, 248, None),
    ],
)
def test_other_subsets_window_counts(subset, train_windows, test_units, padded, cmapss_dir):
    window = 21 if subset == "FD002" else 30
    cfg = _cfg(subset, val_fraction=0.0, window=window, data_dir=str(cmapss_dir))
    prepared = dataset.prepare(cfg.data, cfg.seed)
    assert len(prepared.train) == train_windows
    assert len(prepared.test) == test_units
    lengths = prepared.raw.test.frame.groupby("unit").size().to_numpy()
    assert prepared.test.num_padded == (lengths < window).sum()
    if padded is not None:
        assert prepared.test.num_padded == padded
    truth = np.minimum(np.loadtxt(cmapss_dir / f"RUL_{subset}.txt"), 125)
    np.testing.assert_array_equal(prepared.test.gather(np.arange(test_units))["y"], truth)


def test_short_test_units_are_padded_and_masked(cmapss_dir):
    cfg = _cfg("FD004", data_dir=str(cmapss_dir))  # FD004 has test units shorter than 30
    prepared = dataset.prepare(cfg.data, cfg.seed)
    test = prepared.test
    assert test.num_padded > 0
    lengths = prepared.raw.test.frame.groupby("unit").size().to_numpy()
    batch = test.gather(np.arange(len(test)))
    np.testing.assert_array_equal(batch["mask"].sum(axis=1), np.minimum(lengths, 30))
    short = int(np.argmin(lengths))
    n = lengths[short]
    assert not batch["mask"][short, : 30 - n].any() and (batch["x"][short, : 30 - n] == 0).all()
    # The unpadded tail holds exactly the unit's last n rows, scaled.
    rows = prepared.scaler.transform(
        prepared.raw.test.frame[prepared.raw.test.frame["unit"] == short]
    )
    np.testing.assert_array_equal(batch["x"][short, 30 - n :], rows[-n:])


def test_gather_equals_naive_slicing():
    prepared = dataset.prepare(_cfg().data, 0)
    w = prepared.train
    ids = np.array([0, 5, 100, len(w) - 1])
    batch = w.gather(ids)
    for i, wid in enumerate(ids):
        end = w.ends[wid]
        np.testing.assert_array_equal(batch["x"][i], w.features[end - 29 : end + 1])
        assert batch["y"][i] == w.targets[end]


def test_window_ends_stride_keeps_failure_row():
    ends = window_ends(np.array([0, 10]), np.array([10, 13]), window=4, stride=3, mode="train")
    # unit 0 rows 0..9: windows end at 9, 6, 3; unit 1 (3 rows < 4): one padded window at 12
    assert ends.tolist() == [3, 6, 9, 12]
    with pytest.raises(ConfigError):
        window_ends(np.array([0]), np.array([5]), window=0, stride=1, mode="train")


def test_min_history_adds_left_padded_windows_of_short_histories(caplog):
    starts, stops = np.array([0, 10]), np.array([10, 13])
    ends = window_ends(starts, stops, window=4, stride=1, mode="train", min_history=2)
    # unit 0: histories of 2..10 rows end at rows 1..9; unit 1 (3 rows): ends at 11, 12
    assert ends.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12]
    capped = window_ends(starts, stops, window=4, stride=1, mode="train", min_history=9)
    assert capped.tolist() == window_ends(starts, stops, 4, 1, "train").tolist()
    cfg = _cfg()
    full = dataset.prepare(cfg.data, 0)
    cfg.data.min_history = 10
    caplog.set_level(logging.INFO, logger="pdm_jax.data.dataset")
    short = dataset.prepare(cfg.data, 0)
    units = len(full.train_units)
    # Padded on purpose: an info line counting windows, not the short-unit warning.
    assert [r.levelname for r in caplog.records if "training" in r.getMessage()] == ["INFO"]
    assert f"{units * 20} of {len(short.train)} training windows" in caplog.text
    assert len(short.train) == len(full.train) + units * (30 - 10)
    assert len(short.val) == len(full.val) + len(full.val_units) * (30 - 10)
    batch = short.train.gather(np.arange(len(short.train)))
    valid = batch["mask"].sum(axis=1)
    assert valid.min() == 10 and (valid < 30).sum() == units * 20
    assert (batch["x"][~batch["mask"]] == 0).all()


def test_min_history_is_checked():
    cfg = _cfg()
    cfg.data.min_history = -1
    with pytest.raises(ConfigError, match=r"config\.data\.min_history: expected an integer >= 0"):
        configuration.validate(cfg)


def test_same_seed_same_batches_different_seed_differs():
    w = dataset.prepare(_cfg().data, 0).train
    a = [next(TrainIterator(w, 64, seed=1))["x"] for _ in range(1)]
    it1, it2, it3 = (
        TrainIterator(w, 64, seed=1),
        TrainIterator(w, 64, seed=1),
        TrainIterator(w, 64, seed=2),
    )
    for _ in range(3):
        b1, b2, b3 = next(it1), next(it2), next(it3)
        np.testing.assert_array_equal(b1["x"], b2["x"])
        assert not np.array_equal(b1["y"], b3["y"])
    np.testing.assert_array_equal(a[0], TrainIterator(w, 64, seed=1).__next__()["x"])


def test_epochs_cover_every_window_once_and_reshuffle():
    w = dataset.prepare(_cfg().data, 0).train
    order = BatchOrder(len(w), 100, seed=0)
    epoch0 = np.concatenate([order.batch_ids(k) for k in range(order.batches_per_epoch)])
    assert len(np.unique(epoch0)) == len(epoch0) == order.batches_per_epoch * 100
    assert not np.array_equal(order.batch_ids(0), order.batch_ids(order.batches_per_epoch))


@pytest.mark.parametrize("hosts", [2, 4])
def test_host_slices_union_equals_single_host_batch(hosts):
    w = dataset.prepare(_cfg().data, 0).train
    single = TrainIterator(w, 64, seed=7)
    per_host = [TrainIterator(w, 64, seed=7, host_index=h, host_count=hosts) for h in range(hosts)]
    for _ in range(5):
        whole = next(single)
        parts = [next(it) for it in per_host]
        for key in ("x", "mask", "y", "unit"):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
        assert all(p["x"].shape[0] == 64 // hosts for p in parts)
    with pytest.raises(ConfigError, match="not divisible by the 3 hosts"):
        TrainIterator(w, 64, seed=7, host_index=0, host_count=3)


_CHILD = """
import json, sys
import numpy as np
from pdm_jax.data import dataset
from pdm_jax.data.pipeline import TrainIterator
from tests.conftest import load_config
cfg = load_config()
w = dataset.prepare(cfg.data, 0).train
args = json.loads(sys.argv[1])
it = TrainIterator(w, 64, seed=3, host_index=args["host"], host_count=args["hosts"])
if args.get("state"):
    it.set_state(args["state"])
out = []
for _ in range(args["take"]):
    b = next(it)
    out.append([b["unit"].tolist(), b["time"].tolist()])
print(json.dumps({"batches": out, "state": it.get_state()}))
"""


def _child(**args):
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_state_restores_in_a_fresh_process_on_another_layout():
    w = dataset.prepare(_cfg().data, 0).train
    reference = TrainIterator(w, 64, seed=3)
    # 230 batches span epoch boundaries (221 batches per epoch at batch 64).
    expected = [next(reference) for _ in range(230)]
    first = _child(host=0, hosts=1, take=220)
    state = first["state"]
    assert state["next_batch"] == 220 and json.loads(json.dumps(state)) == state
    # Resume on two hosts in two fresh processes: their slices make up the expected batches.
    h0 = _child(host=0, hosts=2, take=10, state=state)
    h1 = _child(host=1, hosts=2, take=10, state=state)
    for i in range(10):
        exp = expected[220 + i]
        units = h0["batches"][i][0] + h1["batches"][i][0]
        times = h0["batches"][i][1] + h1["batches"][i][1]
        assert units == exp["unit"].tolist() and times == exp["time"].tolist()
    assert h0["state"]["next_batch"] == 230 and h0["state"]["epoch"] == 1


def test_state_refuses_a_different_order():
    w = dataset.prepare(_cfg().data, 0).train
    it = TrainIterator(w, 64, seed=3)
    state = it.get_state()
    with pytest.raises(DataError, match="seed=3 but this run has 4"):
        TrainIterator(w, 64, seed=4).set_state(state)
    with pytest.raises(DataError, match="global_batch=64 but this run has 32"):
        TrainIterator(w, 32, seed=3).set_state(state)


def test_eval_batches_fixed_shape_with_valid_mask():
    test = dataset.prepare(_cfg().data, 0).test
    batches = list(eval_batches(test, 64))
    assert [b["x"].shape for b in batches] == [(64, 30, 14), (64, 30, 14)]
    assert sum(int(b["valid"].sum()) for b in batches) == 100
    units = np.concatenate([b["unit"][b["valid"]] for b in batches])
    assert units.tolist() == list(range(100))


def test_too_few_windows_for_a_batch():
    w = dataset.prepare(_cfg().data, 0).test
    with pytest.raises(DataError, match="only 100 training windows, fewer than one global batch"):
        TrainIterator(w, 256, seed=0)


def test_use_time_feeds_each_row_s_age_scaled_like_a_sensor():
    cfg = _cfg()
    plain = dataset.prepare(cfg.data, 0)
    cfg.data.use_time = True
    aged = dataset.prepare(cfg.data, 0)
    assert aged.scaler.features == (*plain.scaler.features, "time")
    batch = aged.test.gather(np.arange(len(aged.test)))
    np.testing.assert_array_equal(batch["x"][..., :-1], plain.test.gather(np.arange(100))["x"])
    age = batch["x"][..., -1]
    # The training units' cycles (1 to the longest life) map to [-1, 1]: one step per cycle.
    first, longest = aged.scaler.mins[0, -1], aged.scaler.maxs[0, -1]
    assert first == 1 and 300 < longest <= 362
    step = 2.0 / (longest - 1)
    np.testing.assert_allclose(np.diff(age, axis=1), step, rtol=1e-4)
    history = cmapss.read_history(cmapss.EMBEDDED_DIR / "test_FD001.txt.gz")
    last = history.groupby("unit", sort=False)["cycle"].max().to_numpy()
    np.testing.assert_allclose(age[:, -1], -1.0 + (last - 1) * step, atol=1e-5)


def test_baseline_cycles_append_each_sensor_s_change_since_its_unit_s_early_life():
    cfg = _cfg(use_time=True)
    plain = dataset.prepare(cfg.data, 0)
    cfg.data.baseline_cycles = 5
    based = dataset.prepare(cfg.data, 0)
    sensors = len(plain.scaler.features) - 1  # the age gets no baseline
    names = dataset.input_names(based.scaler, 5)
    assert names[: sensors + 1] == plain.scaler.features
    assert names[sensors + 1 :] == tuple(f"{s}-baseline" for s in plain.scaler.features[:-1])
    x = based.val.features
    np.testing.assert_array_equal(x[:, : sensors + 1], plain.val.features)
    # Each row's level is the mean of its unit's first five rows, or of its rows so far.
    start = based.val.row_start
    for r in (start[0], start[0] + 2, start[0] + 4, start[0] + 90, len(x) - 1):
        first = start[r]
        seen = plain.val.features[first : min(r + 1, first + 5), :sensors]
        np.testing.assert_allclose(x[r, sensors + 1 :], x[r, :sensors] - seen.mean(0), atol=1e-6)
    # Causal and per unit: a unit cut short, alone in its table, gets the rows it had at that age.
    table = based.raw.train.select_units(based.val_units[3:4])
    cut = table.frame.iloc[:12].reset_index(drop=True)
    short = dataclasses.replace(table, frame=cut)
    alone = dataset.make_windows(short, based.scaler, 125.0, 80, 1, "last", baseline_cycles=5)
    own = np.flatnonzero(based.val.row_unit == 3)[:12]
    np.testing.assert_array_equal(alone.features, x[own])
    cfg.data.baseline_cycles = -1
    with pytest.raises(ConfigError, match=r"data\.baseline_cycles"):
        configuration.validate(cfg)
