"""A frozen, real format-2 run (tests/fixtures/run_v2): a CNN-BiLSTM trained 4 steps on the
embedded FD001, with baseline inputs and the age, saved with its calibrated band. Whatever the
code's shape becomes, the checkpoint must restore, predict the FD001 test units exactly as it did
when it was written, and resume to the same parameters' predictions.

How it was made (the expected files come from the same code, right after):

    python -m pdm_jax.main --config=configs/cnn_bilstm.py --workdir=tests/fixtures/run_v2 \
      --config.train.num_steps=4 --config.train.eval_every=2 --config.train.batch_size=32 \
      --config.data.window=30 --config.data.baseline_cycles=5 \
      --config.model.cnn_bilstm.channels='(8,)' --config.model.cnn_bilstm.dilations='(1,)' \
      --config.model.cnn_bilstm.lstm_hidden=8 --config.model.cnn_bilstm.dense=8 \
      --config.train.plots=False --config.train.tensorboard=False
    python scripts/predict.py --checkpoint=tests/fixtures/run_v2 \
      --input=pdm_jax/data/embedded/test_FD001.txt.gz \
      --output=tests/fixtures/run_v2/expected/predictions.csv
    # expected/resumed_to_8.json: the same command with --config.train.num_steps=8 on a copy

run_info.json and metrics.jsonl were left out; Orbax's commit files had their text shortened.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_collections
import numpy as np
import pandas as pd
import pytest

from pdm_jax import checkpoint, inference, training
from pdm_jax.data import cmapss

FIXTURE = Path(__file__).with_name("fixtures") / "run_v2"
EXPECTED = FIXTURE / "expected"


@pytest.fixture
def run_copy(tmp_path) -> Path:
    """The fixture copied out: restoring or resuming must never write into the repository."""
    target = tmp_path / "run_v2"
    shutil.copytree(FIXTURE, target, ignore=shutil.ignore_patterns("expected"))
    return target


def _test_file() -> str:
    directory, suffix = cmapss.locate("FD001")
    return str(directory / f"test_FD001.txt{suffix}")


def test_format_2_run_restores_with_its_band_and_predicts_as_written(run_copy):
    with checkpoint.CheckpointStore(str(run_copy / "checkpoints"), create=False) as store:
        assert store.all_steps() == [4]
    saved = inference.read_saved(str(run_copy), "best")
    assert saved.step == 4
    frame = inference.predict_files(str(run_copy), [_test_file()], show_progress=False)
    expected = pd.read_csv(EXPECTED / "predictions.csv")
    assert list(frame.columns) == list(expected.columns)
    np.testing.assert_array_equal(frame["unit"], expected["unit"])
    np.testing.assert_array_equal(frame["time"], expected["time"])
    for column in ("rul_pred", "rul_p10", "rul_p90"):
        np.testing.assert_allclose(frame[column], expected[column], rtol=1e-5, atol=1e-4)


def test_format_2_run_resumes_to_the_same_predictions(run_copy):
    config = ml_collections.ConfigDict(json.loads((run_copy / "config.json").read_text()))
    config.train.num_steps = 8
    config.checkpoint.uri = None  # the copy's own checkpoints/, not where it was written
    result = training.train_and_evaluate(config, str(run_copy))
    expected = json.loads((EXPECTED / "resumed_to_8.json").read_text())
    assert result["resumed_from_step"] == 4
    assert result["steps"] == expected["steps"] == 8
    assert result["best_step"] == expected["best_step"]
    got = {u["unit"]: u for u in result["per_unit"]}
    for want in expected["per_unit"]:
        for key in ("pred", "p10", "p90"):
            assert got[want["unit"]][key] == pytest.approx(want[key], rel=1e-5, abs=1e-4)
