"""Batch inference from a checkpoint alone: `predict_files(checkpoint, inputs, output)`.

A checkpoint step carries the resolved config and the fitted scaler next to the arrays, so new
histories are windowed and scaled exactly as the training run did it, without the training data
and without pickle. Inputs are C-MAPSS text files (`test_FD00x.txt`) or CSV/Parquet tables in the
training run's column layout; checks run on every input before the first prediction, and the
output appears only complete (temp file, then `os.replace`).

Prediction streams fixed-shape batches (the last one padded and masked) through one compiled
function, sharded over every local device: the same code serves a laptop CPU and an 8-GPU host.

Why a package apart from `training`: predicting needs a checkpoint, `optim` (to restore into the
saved state's shape) and `prediction` (the batch loop evaluation also uses), never the training
loop. Modules: `predictor` (the checkpoint read and restored), `inputs` (input files checked and
read), `run` (the prediction frames and the output), `export` (a checkpoint as one
self-contained `jax.export` artifact) and `exported` (predictions from one).
"""

from pdm_jax.inference.exported import iter_exported, load_exported, predict_exported
from pdm_jax.inference.inputs import OUT_OF_RANGE, Input, Source, open_source, read_chunks
from pdm_jax.inference.predictor import (
    INTERVALS,
    STEP_CHOICES,
    Columns,
    Predictor,
    Saved,
    load,
    read_saved,
    store_uri,
)
from pdm_jax.inference.run import (
    DEFAULT_BATCH,
    PredictOptions,
    iter_predictions,
    predict_files,
    predict_to_file,
    quantile_column,
)

__all__ = [
    "DEFAULT_BATCH",
    "INTERVALS",
    "OUT_OF_RANGE",
    "STEP_CHOICES",
    "Columns",
    "Input",
    "PredictOptions",
    "Predictor",
    "Saved",
    "Source",
    "iter_exported",
    "iter_predictions",
    "load",
    "load_exported",
    "open_source",
    "predict_exported",
    "predict_files",
    "predict_to_file",
    "quantile_column",
    "read_chunks",
    "read_saved",
    "store_uri",
]
