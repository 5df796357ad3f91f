"""Shared fixtures: where the real C-MAPSS files are, and a CSV-writing helper.

Tests read the real benchmark, all 12 NASA files (train_/test_/RUL_FD001..FD004.txt), found as a
user's run finds its data, in this order: $PDM_DATA_DIR; the repository's sibling
`../shared/data/cmapss` where it exists; the user cache (`~/.cache/pdm_jax/cmapss`, or under
$XDG_CACHE_HOME); else NASA's zip is downloaded into the user cache, every file checked against
its pinned sha256 (`scripts/download_cmapss.py` does the same by hand). When all of these fail,
the tests that need the files fail with one message saying what to set, rather than skipping,
because a skipped data test proves nothing.
"""

import fcntl
import json
import os
import pathlib
import shutil
import subprocess
import sys

# Before jax initialises its CPU backend: compile with LLVM's cheaper optimisation level. It halves
# compile time on this 2-core CPU (12 s -> 5.4 s for the TFT's train step) without changing what
# is computed; speed is measured by scripts/benchmark.py at the default level, never in tests.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]
).strip()

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SIBLING_DATA = REPO.parent / "shared" / "data" / "cmapss"


class MissingData(Exception):
    """No place held the C-MAPSS files and the download failed: the message says what to set."""


def _complete(directory: pathlib.Path) -> bool:
    from pdm_jax.data import cmapss

    names = [f for subset in cmapss.SUBSETS for f in cmapss.subset_files(subset)]
    return all((directory / name).is_file() for name in names)


def find_test_data(
    env_dir: str | None = None,
    sibling: pathlib.Path = SIBLING_DATA,
    cache: pathlib.Path | None = None,
    url: str | None = None,
    timeout: float = 60.0,
) -> pathlib.Path:
    """The first of $PDM_DATA_DIR, the sibling directory and the user cache that holds all 12
    files; else downloads NASA's zip into the cache (sha256-checked, all files or none)."""
    from pdm_jax.data import cmapss, download
    from pdm_jax.errors import DataError

    cache = cache if cache is not None else cmapss.cache_dir()
    looked = []
    for label, directory in (
        (f"${cmapss.ENV_DATA_DIR}", pathlib.Path(env_dir).expanduser() if env_dir else None),
        ("the repository's sibling", sibling),
        ("the user cache", cache),
    ):
        if directory is not None and _complete(directory):
            return directory
        looked.append(f"{label} ({directory if directory is not None else 'unset'})")
    url = url or download.DEFAULT_URL
    try:
        return download.download_cmapss(dest=cache, url=url, timeout=timeout, progress=False)
    except DataError as err:
        raise MissingData(
            f"C-MAPSS FD001-FD004 not found in {', '.join(looked)}, and downloading {url} failed "
            f"({err}); set ${cmapss.ENV_DATA_DIR} to a directory holding the 12 NASA files "
            "train_/test_/RUL_FD001..FD004.txt"
        ) from None


@pytest.fixture(scope="session")
def cmapss_dir() -> pathlib.Path:
    """Runs before the autouse fixture below hides $PDM_DATA_DIR and the cache (session scope
    first), so it sees the user's own."""
    try:
        return find_test_data(os.environ.get("PDM_DATA_DIR"))
    except MissingData as err:
        pytest.fail(str(err), pytrace=False)


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    return REPO


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep the user cache and $PDM_DATA_DIR out of tests unless a test sets them itself."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("PDM_DATA_DIR", raising=False)


def load_config(name: str = "common"):
    """A config from configs/<name>.py, exactly as --config=configs/<name>.py loads it. The
    default is the shared defaults (a TFT with the plain C-MAPSS protocol: 14 sensors, windows
    of 30, no extra inputs), the base the data and loop tests build on."""
    from pdm_jax.configuration import load_config as load

    return load(name)


# tiny_cnn_config() below as command-line flags, for tests that run real main/tune processes.
TINY_CNN_FLAGS = [
    "--config=configs/cnn_bilstm.py",
    "--config.model.cnn_bilstm.channels=(8,)",
    "--config.model.cnn_bilstm.dilations=(1,)",
    "--config.model.cnn_bilstm.lstm_hidden=8",
    "--config.model.cnn_bilstm.dense=8",
]


# A tiny CNN-BiLSTM run as `python -m pdm_jax.main` flags: saves every 10 steps, no extras.
TINY_RUN_FLAGS = [
    *TINY_CNN_FLAGS,
    "--config.train.batch_size=32",
    "--config.train.eval_every=10",
    "--config.train.patience=0",
    "--config.train.tensorboard=False",
    "--config.train.plots=False",
    "--config.checkpoint.every_steps=10",
]


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


def fuzz_settings(examples: int):
    """Hypothesis settings of the fuzz tests: the same cases on every machine (derandomized, no
    example database), no per-case deadline (a first case compiles), and the count fixed so the
    number each test reports is what ran."""
    from hypothesis import HealthCheck, settings

    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def assert_one_line_naming(err: BaseException, *names: str) -> None:
    """The error a command prints as its one `error:` line: printable (so one line, without
    control codes) and naming one of `names` (the file or the config key)."""
    text = str(err)
    assert text and text.isprintable(), repr(text)
    assert any(name in text for name in names), (names, text)


def as_format_1(store: pathlib.Path) -> None:
    """Rewrites a checkpoint store's metadata as format 1 wrote it (no interval calibration), so
    tests can check that checkpoints from before format 2 still predict, evaluate and resume."""
    files = list(store.glob("*/meta/metadata"))
    assert files, f"no checkpoint steps in {store}"
    for manifest in store.glob("*/pdm-checksums.json"):
        manifest.unlink()  # format 1 steps had none, and the rewrite below changes the bytes
    for meta_file in files:
        meta = json.loads(meta_file.read_text())
        meta.pop("calibration")
        meta["format_version"] = 1
        meta_file.write_text(json.dumps(meta))


# Two short training runs whose checkpoints the inference and export tests read: a tiny
# CNN-BiLSTM on 8 simulated devices reading baseline inputs and the unit's age, and a tiny TFT
# ensemble of two members (config.model.ensemble) for the quantile columns.
TRAIN = [
    "--config.train.batch_size=64",
    "--config.train.eval_every=10",
    "--config.train.tensorboard=False",
    "--config.train.plots=False",
]
CNN = [
    "--config=configs/cnn_bilstm.py",
    "--config.data.window=30",  # the test file's unit 7 cut to 5 rows is its only short unit
    "--config.data.use_time=True",  # the unit's age, read from each file's time column
    "--config.data.baseline_cycles=5",  # inputs computed from each unit's own first rows
    "--config.train.num_steps=20",
    "--config.model.cnn_bilstm.channels=(8,)",
    "--config.model.cnn_bilstm.dilations=(1,)",
    "--config.model.cnn_bilstm.lstm_hidden=8",
    "--config.model.cnn_bilstm.dense=8",
]
# A high constant rate without warm-up: 40 steps are then enough for the quantile heads to fan out
# around the median (with the default warm-up they are still bunched together).
TFT = [
    "--config=configs/tft.py",
    "--config.train.num_steps=40",
    "--config.train.eval_every=20",
    "--config.train.warmup_steps=0",
    "--config.train.learning_rate=0.03",
    "--config.model.tft.hidden=8",
    "--config.model.tft.heads=1",
    "--config.model.tft.var_hidden=4",
    "--config.model.ensemble=2",
]


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """{'cnn': workdir, 'tft': workdir}: both trainings run at once (they share two cores),
    once per test run: inference and export tests read the same checkpoints. Under pytest-xdist
    each worker is a session of its own, so the first to get here trains under a file lock in
    the directory the workers share and the others read its runs (every user only reads)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    root = shared / "shared-runs"
    with open(shared / "shared-runs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "trained").exists():
            shutil.rmtree(root, ignore_errors=True)
            _train_runs(root)
            (root / "trained").touch()
    return {name: root / name for name in ("cnn", "tft")}


def _train_runs(root: pathlib.Path) -> None:
    from tests.test_parallel import _env  # test_parallel imports this module

    jobs = {
        "cnn": (CNN, 8),
        "tft": (TFT, 1),
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "pdm_jax.main", *args, *TRAIN, f"--workdir={root / name}"],
            cwd=REPO,
            env=_env(devices),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, (args, devices) in jobs.items()
    }
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}:\n{out[-3000:]}"
