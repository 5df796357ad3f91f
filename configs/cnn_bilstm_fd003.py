"""CNN-BiLSTM for C-MAPSS FD003: configs/cnn_bilstm.py with the inputs and window chosen here.

`python -m pdm_jax.main --config=configs/cnn_bilstm_fd003.py`. Chosen on validation RMSE,
seeds 0-2 (the tuning logs on longer windows and on each unit's early-life level in
experiments/README.md; rows in experiments/results/search_cnn.md); the five-seed test rows are in
experiments/results/accuracy.md.
"""

import pathlib

import ml_collections

from pdm_jax.configuration import load_module

base = load_module(pathlib.Path(__file__).with_name("cnn_bilstm.py"))


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.data.subset = "FD003"
    # Validation RMSE, seeds 0-2 (experiments/results/search_cnn.md): windows of 80 cycles
    # instead of 50 took the mean from 10.14 to 9.52. A learning rate of 3e-4 (FD001's choice)
    # made seed 0 worse here (9.66 against 9.08), and Gaussian input noise of 0.15 too
    # (10.38 against 9.08, stopped early).
    config.data.window = 80
    # Validation RMSE, seeds 0-2 (experiments/results/search_cnn.md): each sensor's change since the
    # unit's first 20 cycles as extra inputs (engines start at different offsets a window alone
    # cannot tell from wear) took the mean validation RMSE from 9.52 to 9.07 (8.54 / 9.26 / 9.42).
    config.data.baseline_cycles = 20
    return config
