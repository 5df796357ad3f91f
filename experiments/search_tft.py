"""The TFT search: the levers the CNN-BiLSTM's search found, tried on the TFT, scored on
validation RMSE (seeds 0-2 once a variant earns them; the test columns are printed beside but
never chose anything).

Every variant is written as overrides of `configs/common.py` (the TFT with the shared defaults),
so each row reruns with one command (`scripts/experiments.py --plan=experiments/search_tft.py
--only=ROW_ID`). The rows recorded before `configs/tft.py` took the search's choice name
`configs/tft.py`, which was then exactly what `configs/common.py` is.

- `default`: `configs/common.py` as it is (quantile head on raw cycles, window 30).
- `s25`: the head's outputs scaled by 25 and offset by 60 cycles, as the CNN-BiLSTM's: the head
  then learns targets of order 1 instead of climbing to ~60-125 cycles from 0.
- `s25t`: and the unit's age (`data.use_time`) as an input.
- `s25tb40`: and each sensor's change since the unit's first 40 cycles (`data.baseline_cycles`).
- `s25tb40w50`: and windows of 50 with histories from 10 cycles, as the CNN-BiLSTM's default.

Loaded by path (`pdm_jax.configuration.load_module`) by `scripts/experiments.py`.
"""

from __future__ import annotations

from typing import Any

MODEL = "tft"
SCALED = {"model.target_scale": 25.0, "model.target_offset": 60.0}
AGE = {"data.use_time": True}
BASELINE = {"data.baseline_cycles": 40}
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "s25": SCALED,
    "s25t": {**SCALED, **AGE},
    "s25tb40": {**SCALED, **AGE, **BASELINE},
    "s25tb40w50": {**SCALED, **AGE, **BASELINE, "data.window": 50, "data.min_history": 10},
}
SUBSETS = ("FD001",)
SEEDS = (0, 1, 2)


def row(variant: str, subset: str, seed: int) -> dict[str, Any]:
    return {
        "id": f"{variant}-{subset}-s{seed}",
        "config": "configs/common.py",
        "overrides": {**VARIANTS[variant], "data.subset": subset, "seed": seed},
        "group": f"{variant} {subset}",
        "model": MODEL,
        "subset": subset,
        "seed": seed,
        "note": ", ".join(f"{k}={v}" for k, v in VARIANTS[variant].items()),
    }


def get_plan() -> list[dict[str, Any]]:
    return [
        row(variant, subset, seed) for subset in SUBSETS for seed in SEEDS for variant in VARIANTS
    ]
