"""Shared fixtures: where the real C-MAPSS files are, and a CSV-writing helper.

Tests read the real benchmark from ../shared/data/cmapss (or $PDM_DATA_DIR); when it is missing
they fail with a clear message instead of skipping, because a skipped data test proves nothing.
"""

import json
import os
import pathlib

# Before jax initialises its CPU backend: compile with LLVM's cheaper optimisation level. It halves
# compile time on this 2-core CPU (12 s -> 5.4 s for the TFT's train step) without changing what
# is computed; speed is measured by scripts/benchmark.py at the default level, never in tests.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]
).strip()

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def shared_cmapss_dir() -> pathlib.Path:
    env = os.environ.get("PDM_DATA_DIR")
    return pathlib.Path(env) if env else REPO.parent / "shared" / "data" / "cmapss"


@pytest.fixture(scope="session")
def cmapss_dir() -> pathlib.Path:
    directory = shared_cmapss_dir()
    if not (directory / "train_FD002.txt").is_file():
        pytest.fail(
            f"C-MAPSS reference files not found in {directory}; set PDM_DATA_DIR to a directory "
            "holding the 12 NASA text files"
        )
    return directory


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    return REPO


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep the user cache and $PDM_DATA_DIR out of tests unless a test sets them itself."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("PDM_DATA_DIR", raising=False)


def load_config(name: str = "tft"):
    """A config from configs/<name>.py, exactly as --config=configs/<name>.py loads it."""
    from pdm_jax.configuration import load_config as load

    return load(name)


def tiny_cnn_config(dropout: float | None = None):
    """configs/cnn_bilstm.py shrunk to compile in about a second: for tests of the loop, not of
    the model."""
    cfg = load_config("cnn_bilstm")
    cfg.model.cnn_bilstm.channels = (8,)
    cfg.model.cnn_bilstm.dilations = (1,)
    cfg.model.cnn_bilstm.lstm_hidden = 8
    cfg.model.cnn_bilstm.dense = 8
    if dropout is not None:
        cfg.model.dropout = dropout
    return cfg


def as_format_1(store: pathlib.Path) -> None:
    """Rewrites a checkpoint store's metadata as format 1 wrote it (no interval calibration), so
    tests can check that checkpoints from before format 2 still predict, evaluate and resume."""
    files = list(store.glob("*/meta/metadata"))
    assert files, f"no checkpoint steps in {store}"
    for meta_file in files:
        meta = json.loads(meta_file.read_text())
        meta.pop("calibration")
        meta["format_version"] = 1
        meta_file.write_text(json.dumps(meta))
