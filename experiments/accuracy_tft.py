"""The TFT's accuracy table: `configs/tft.py` (the README's main job) on every C-MAPSS subset,
five seeds, beside the CNN-BiLSTM's table (`accuracy.py`).

The config was chosen on FD001's validation units (`search_tft.py`) and runs unchanged on the
other subsets (only `data.subset` and the seed differ), so each row is one command. A subset
gets a config of its own (`configs/tft_fd00N.py`) only where its validation RMSE asks for one;
such rows are added here as a group of their own.

Rows run FD001 first (the main job's five seeds), then FD003, then FD002 and FD004 seed by seed
(the two large subsets take ~3x as long per run), so a partial table is complete where it
matters most.

Loaded by path (`pdm_jax.configuration.load_module`) by `scripts/experiments.py`.
"""

from __future__ import annotations

from typing import Any

MODEL = "tft"
SUBSETS = ("FD001", "FD003", "FD002", "FD004")
SEEDS = (0, 1, 2, 3, 4)
# The TFT's targets: mean test RMSE over the five seeds (the best published transformer, DAST:
# 11.43 / 15.25 / 11.32 / 18.36).
TARGETS = {"FD001": 11.5, "FD002": 13.0, "FD003": 11.5, "FD004": 14.0}


def row(subset: str, seed: int) -> dict[str, Any]:
    return {
        "id": f"{MODEL}-{subset}-s{seed}",
        "config": f"configs/{MODEL}.py",
        "overrides": {"data.subset": subset, "seed": seed},
        "group": f"{MODEL} {subset}",
        "model": MODEL,
        "subset": subset,
        "seed": seed,
        "note": f"target {TARGETS[subset]}",
    }


def get_plan() -> list[dict[str, Any]]:
    small = [row(subset, seed) for subset in ("FD001", "FD003") for seed in SEEDS]
    large = [row(subset, seed) for seed in SEEDS for subset in ("FD002", "FD004")]
    return small + large
