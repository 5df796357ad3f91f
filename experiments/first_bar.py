"""The first accuracy table: C-MAPSS RMSE / PHM08 per model, subset and seed.

FD001 (one condition, one fault) and FD004 (six conditions, two faults) bracket the benchmark's
difficulty, so both models run there; FD002/FD003 only for the better model, which halves the
CPU time of the least informative cells. Three seeds per cell because one seed cannot tell a
model difference from initialisation noise. Rows are seed-major, so a partly filled table
already has one seed in every cell instead of three in a few.

Loaded by path (`pdm_jax.configuration.load_module`) by `scripts/experiments.py`.
"""

from __future__ import annotations

from typing import Any

# Switch to "tft" if FD001/FD004 show it is the better model; FD002/FD003 rows then rerun under
# new ids (the old ones stay in the results file but leave the table).
BETTER_MODEL = "cnn_bilstm"
MODELS = ("tft", "cnn_bilstm")
MAIN_SUBSETS = ("FD001", "FD004")
BETTER_MODEL_SUBSETS = ("FD002", "FD003")
SEEDS = (0, 1, 2)
# Overrides shared by every row (e.g. {"train.patience": 20}). Changing them does not rerun
# finished rows: ids, not overrides, decide what is done.
COMMON: dict[str, Any] = {}


def row(model: str, subset: str, seed: int, note: str = "") -> dict[str, Any]:
    return {
        "id": f"{model}-{subset}-s{seed}",
        "config": f"configs/{model}.py",
        "overrides": {**COMMON, "data.subset": subset, "seed": seed},
        "group": f"{model} {subset}",
        "model": model,
        "subset": subset,
        "seed": seed,
        "better_model": bool(note),
        "note": note,
    }


def get_plan() -> list[dict[str, Any]]:
    rows = [
        row(model, subset, seed) for seed in SEEDS for subset in MAIN_SUBSETS for model in MODELS
    ]
    rows += [
        row(BETTER_MODEL, subset, seed, note="better model")
        for seed in SEEDS
        for subset in BETTER_MODEL_SUBSETS
    ]
    return rows
