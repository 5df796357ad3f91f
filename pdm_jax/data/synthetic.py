"""Seeded synthetic run-to-failure data, so tests, demos and benchmarks need no files.

C-MAPSS has a fixed size (100-260 units per subset) and lives on disk; the synthetic source
makes `RawData` of any size (10k units in about a second; memory is proportional to rows,
about 170 bytes a row with 14 sensors: every step is vectorised, nothing loops over units or
rows) with the same shape as
`cmapss.load_cmapss`: settings `setting_1..3`, sensors `s_1..s_n`, float64 columns, RUL truth
at every row. The same arguments always give identical frames.

The model, per unit with life L (uniform in [min_life, max_life]):

* degradation d(t) = d0 + (1 - d0) * (exp(a (t/L)^b) - 1) / (exp(a) - 1), with initial wear
  d0 in [0, 0.1], a in [0.5, 2] and b in [1, 2] drawn per unit, so d rises convexly and reaches
  the failure threshold 1 exactly at t = L (health index h = 1 - d);
* operating settings: with one condition a fixed point (0, 0, 100) plus tiny noise (like
  FD001); with k > 1 conditions, k well separated fixed points and a per-row Markov walk
  between them (like FD002: each row keeps its regime or jumps to a uniformly drawn one);
* sensor s: offset[condition, s] + gain[s] * d + noise * noise_scale[s] * N(0, 1), where the
  offsets shift by up to +-30% of the sensor's level between conditions, the gains are 4-12%
  of the level (about a third of the sensors decrease with wear) and `noise` is relative to
  the level, with a per-sensor factor in [0.5, 1.5].

Train units run to failure (time 1..L, RUL = L - t, 0 at the last row). Test units are further
draws from the same stream, cut at 10-90% of their life (about one in ten at under 30 rows, so
padding paths are exercised), so their last RUL is > 0.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from pdm_jax.data.table import DATASET, RUL, TIME, UNIT, RawData, RunTable
from pdm_jax.errors import ConfigError

SETTINGS = ("setting_1", "setting_2", "setting_3")
MAX_CONDITIONS = 100
# Probability that a row (past a unit's first) redraws its operating regime.
SWITCH_PROB = 0.5
# Settings noise std per column, clipped below 0.005 so rounding to 2 decimals recovers the
# operating point (setting_3, like C-MAPSS's TRA, is exact).
SETTING_NOISE = (0.001, 0.0002, 0.0)
SETTING_NOISE_CLIP = 0.0049
SHORT_TEST_FRACTION = 0.1
SHORT_TEST_ROWS = 29


def _check(
    name: str, value: float, low: float, high: float | None = None, integer: bool = True
) -> None:
    """A typed error naming the argument, so a bad value from a config or flag reads as one line."""
    if integer and (isinstance(value, bool) or not isinstance(value, int | np.integer)):
        raise ConfigError(f"config.data.synthetic.{name}={value!r}: expected an integer")
    if not math.isfinite(value) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"config.data.synthetic.{name}={value!r}: expected {bound}")


def _plant(
    rng: np.random.Generator, num_sensors: int, num_conditions: int
) -> dict[str, np.ndarray]:
    """Dataset-level constants shared by train and test: operating points and sensor models."""
    k = num_conditions
    if k == 1:
        points = np.array([[0.0, 0.0, 100.0]])
    else:
        spacing = 42.0 / (k - 1)
        s1 = np.linspace(0.0, 42.0, k) + rng.uniform(-0.1, 0.1, k) * spacing
        s2 = rng.permutation(np.linspace(0.0, 0.84, k))
        s3 = rng.choice(np.array([60.0, 100.0]), size=k)
        points = np.round(np.stack([s1, s2, s3], axis=1), 2)
    level = 10.0 ** rng.uniform(0.0, 3.5, num_sensors)
    n_down = num_sensors // 3 if num_sensors > 1 else 0
    sign = rng.permutation(np.where(np.arange(num_sensors) < n_down, -1.0, 1.0))
    gain = level * sign * rng.uniform(0.04, 0.12, num_sensors)
    shift = rng.uniform(-0.3, 0.3, (k, num_sensors)) if k > 1 else np.zeros((1, num_sensors))
    offset = level * (1.0 + shift)  # (condition, sensor)
    noise_scale = level * rng.uniform(0.5, 1.5, num_sensors)
    return {"points": points, "gain": gain, "offset": offset, "noise_scale": noise_scale}


def _regimes(rng: np.random.Generator, k: int, total: int, starts: np.ndarray) -> np.ndarray:
    """Each row's operating regime of `k`: drawn at each unit's start and switched at random."""
    if k <= 1:
        return np.zeros(total, dtype=np.int64)
    switch = rng.random(total) < SWITCH_PROB
    switch[starts] = True
    drawn = rng.integers(0, k, total)
    last = np.where(switch, np.arange(total), 0)
    np.maximum.accumulate(last, out=last)
    return drawn[last]


def _table(
    rng: np.random.Generator,
    plant: dict[str, np.ndarray],
    lives: np.ndarray,
    rows: np.ndarray,
    noise: float,
    name: str,
) -> RunTable:
    """Rows 1..rows[u] of each unit u whose life is lives[u] (rows <= lives)."""
    n = len(lives)
    a = rng.uniform(0.5, 2.0, n)
    b = rng.uniform(1.0, 2.0, n)
    d0 = rng.uniform(0.0, 0.1, n)

    total = int(rows.sum())
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(rows[:-1], out=starts[1:])
    codes = np.repeat(np.arange(n, dtype=np.int64), rows)
    time = np.arange(total, dtype=np.float64)
    time -= np.repeat(starts, rows) - 1
    life = np.repeat(lives.astype(np.float64), rows)
    rul = life - time

    # Degradation, computed in place: d0 + (1 - d0) * expm1(a x^b) / expm1(a), x = t / L.
    deg = time / life
    np.power(deg, np.repeat(b, rows), out=deg)
    deg *= np.repeat(a, rows)
    np.expm1(deg, out=deg)
    deg *= np.repeat((1.0 - d0) / np.expm1(a), rows)
    deg += np.repeat(d0, rows)
    del life

    points = plant["points"]
    k = len(points)
    regime = _regimes(rng, k, total, starts)

    data: dict[str, np.ndarray] = {
        UNIT: codes,
        TIME: time,
        DATASET: np.zeros(total, dtype=np.int32),
    }
    for j, col in enumerate(SETTINGS):
        values = points[regime, j]
        if SETTING_NOISE[j] > 0:
            jitter = rng.normal(0.0, SETTING_NOISE[j], total)
            np.clip(jitter, -SETTING_NOISE_CLIP, SETTING_NOISE_CLIP, out=jitter)
            values += jitter
        data[col] = values

    # One contiguous row per sensor: offset[regime] + gain * d + noise * scale * eps.
    gain, offset, noise_scale = plant["gain"], plant["offset"], plant["noise_scale"]
    num_sensors = len(gain)
    sensors = rng.standard_normal((num_sensors, total))
    tmp = np.empty(total)
    for s in range(num_sensors):
        row = sensors[s]
        row *= noise * noise_scale[s]
        np.multiply(deg, gain[s], out=tmp)
        row += tmp
        row += offset[regime, s] if k > 1 else offset[0, s]
        data[f"s_{s + 1}"] = row
    data[RUL] = rul

    frame = pd.DataFrame(data, copy=False)
    return RunTable(
        frame=frame,
        settings=SETTINGS,
        sensors=tuple(f"s_{s}" for s in range(1, num_sensors + 1)),
        unit_labels=np.arange(1, n + 1, dtype=np.int64),
        unit_dataset=np.zeros(n, dtype=np.int32),
        name=name,
    )


def generate(
    num_units: int = 100,
    seed: int = 0,
    num_sensors: int = 14,
    num_conditions: int = 1,
    min_life: int = 128,
    max_life: int = 362,
    noise: float = 0.02,
    test_units: int = 0,
) -> RawData:
    """Synthetic run-to-failure histories (see the module docstring for the model).

    `num_conditions` operating regimes (1 like C-MAPSS FD001, 6 like FD002); `noise` is the
    sensor noise std relative to each sensor's level; `test_units` > 0 also makes truncated
    test histories (labels 1..test_units) with RUL truth at every row, else `test` is None.
    The train table does not depend on `test_units`: test units are drawn after it.
    """
    _check("num_units", num_units, 1)
    _check("num_sensors", num_sensors, 1)
    _check("num_conditions", num_conditions, 1, MAX_CONDITIONS)
    _check("min_life", min_life, 2)
    _check("max_life", max_life, min_life)
    _check("noise", noise, 0.0, integer=False)
    _check("test_units", test_units, 0)
    rng = np.random.default_rng(seed)
    plant = _plant(rng, num_sensors, num_conditions)
    name = f"synthetic(seed={seed})"

    lives = rng.integers(min_life, max_life + 1, num_units)
    train = _table(rng, plant, lives, lives, noise, name)

    test = None
    if test_units > 0:
        lives = rng.integers(min_life, max_life + 1, test_units)
        cut = np.floor(rng.uniform(0.1, 0.9, test_units) * lives).astype(np.int64)
        n_short = math.ceil(test_units * SHORT_TEST_FRACTION)
        short = rng.choice(test_units, size=n_short, replace=False)
        cut[short] = rng.integers(1, np.minimum(SHORT_TEST_ROWS, lives[short] - 1) + 1)
        rows = np.clip(cut, 1, lives - 1)
        test = _table(rng, plant, lives, rows, noise, f"{name} test")
    return RawData(train=train, test=test, dataset_names=("synthetic",))
