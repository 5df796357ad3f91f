"""The CNN-BiLSTM search: variants of the default config, scored on validation RMSE, one row per
variant, subset and seed.

Every variant is written as overrides of the current `configs/cnn_bilstm.py`, so each row reruns
with one command (`scripts/experiments.py --plan=experiments/search_cnn.py --only=ROW_ID`) at
any later commit that keeps those keys. `default` is the config the search chose (the unit's age
as an input, dropout 0.3, weight decay 3e-2); `v1` is the default before it. Among longer
windows it chose `w80lr3` for FD001 and `w80` for FD003, then added on top the sensors' changes
since each unit's early-life level (`w80lr3b40` for FD001, `w80b20` for FD003:
`configs/cnn_bilstm_fd001.py`, `_fd003.py`).
Rows run with `runs/sweep/run.sh` (checkpoints off) were recorded into the results by
`make_record` from their run directories; their `command` is the one that actually ran.

Loaded by path (`pdm_jax.configuration.load_module`) by `scripts/experiments.py`.
"""

from __future__ import annotations

from typing import Any

MODEL = "cnn_bilstm"
NO_AGE = {"data.use_time": False}
V1_REGULARISATION = {"model.dropout": 0.1, "train.weight_decay": 1e-4}
VARIANTS: dict[str, dict[str, Any]] = {
    "v1": {**NO_AGE, **V1_REGULARISATION},  # the default before the search
    "d3wd3": NO_AGE,  # dropout 0.3, weight decay 3e-2, no age
    "t": V1_REGULARISATION,  # the age alone
    "default": {},  # dropout 0.3, weight decay 3e-2 and the age: the chosen config
    "ens3d3": {**NO_AGE, "model.ensemble": 3},  # d3wd3 as a three-member ensemble
    "b128": {"train.batch_size": 128},
    "w30": {"data.window": 30},
    # Longer windows, and Gaussian jitter of the readings against the early overfitting (FD001's
    # best validation step comes after ~5 epochs).
    "w80": {"data.window": 80},
    "w80n15": {"data.window": 80, "train.input_noise": 0.15},
    "w120": {"data.window": 120},
    "w80lr3": {"data.window": 80, "train.learning_rate": 3e-4},
    # Each sensor's change since its unit's first 20 cycles as extra inputs, on top of each
    # subset's choice among the longer windows (w80lr3 for FD001, w80 for FD003).
    "w80lr3b20": {"data.window": 80, "train.learning_rate": 3e-4, "data.baseline_cycles": 20},
    "w80b20": {"data.window": 80, "data.baseline_cycles": 20},
    "w80lr3b10": {"data.window": 80, "train.learning_rate": 3e-4, "data.baseline_cycles": 10},
    "w80lr3b40": {"data.window": 80, "train.learning_rate": 3e-4, "data.baseline_cycles": 40},
}
SUBSETS = ("FD001", "FD003")
SEEDS = (0, 1, 2)


def row(variant: str, subset: str, seed: int) -> dict[str, Any]:
    return {
        "id": f"{variant}-{subset}-s{seed}",
        "config": f"configs/{MODEL}.py",
        "overrides": {**VARIANTS[variant], "data.subset": subset, "seed": seed},
        "group": f"{variant} {subset}",
        "model": MODEL,
        "subset": subset,
        "seed": seed,
        "note": ", ".join(f"{k}={v}" for k, v in VARIANTS[variant].items()),
    }


def get_plan() -> list[dict[str, Any]]:
    return [
        row(variant, subset, seed) for subset in SUBSETS for variant in VARIANTS for seed in SEEDS
    ]
