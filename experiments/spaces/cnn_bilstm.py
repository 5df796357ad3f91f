"""The CNN-BiLSTM search (experiments/search_cnn.py's variants) as an Optuna space.

    python scripts/tune.py --config=configs/cnn_bilstm.py --space=experiments/spaces/cnn_bilstm.py \
        --study=cnn-fd001 --storage=sqlite:///runs/tune.db --trials=40 --workdir=runs/tune

The hand-written search tried these axes one variant at a time on FD001 and FD003: the unit's
age as an input, regularisation (dropout with weight decay), batch size, longer windows, a lower
learning rate with them, Gaussian jitter of the readings, and each sensor's change since the
unit's early life. Here they are one space, scored on validation RMSE like the rows were.
"""

from __future__ import annotations

from typing import Any


def space(trial: Any) -> dict[str, Any]:
    """Config overrides for one trial (dotted keys, as --config.KEY=VALUE names them)."""
    return {
        "data.use_time": trial.suggest_categorical("use_time", [True, False]),
        "data.window": trial.suggest_categorical("window", [30, 80, 120]),
        "data.baseline_cycles": trial.suggest_categorical("baseline_cycles", [0, 10, 20, 40]),
        "model.dropout": trial.suggest_float("dropout", 0.1, 0.4),
        "train.weight_decay": trial.suggest_float("weight_decay", 1e-4, 1e-1, log=True),
        "train.learning_rate": trial.suggest_float("learning_rate", 1e-4, 3e-3, log=True),
        "train.batch_size": trial.suggest_categorical("batch_size", [128, 256]),
        "train.input_noise": trial.suggest_categorical("input_noise", [0.0, 0.15]),
    }
