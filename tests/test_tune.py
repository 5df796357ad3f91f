"""scripts/tune.py: an Optuna search whose workers are separate processes sharing one SQLite file.

Workers are real `python scripts/tune.py` subprocesses (the process boundary, and a worker
killed mid-trial, are what is tested); trials are tiny CNN-BiLSTM runs.
"""

import json
import signal
import subprocess
import sys
import time

import optuna
import pytest

from tests.conftest import REPO, TINY_CNN_FLAGS
from tests.test_parallel import _env

SPACE = """
def space(trial):
    return {
        "train.learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-2, log=True),
        "model.dropout": trial.suggest_float("dropout", 0.0, 0.3),
    }
"""
TINY = [
    *TINY_CNN_FLAGS,
    "--config.data.window=10",
    "--config.train.batch_size=32",
    "--config.train.eval_every=5",
    "--config.train.log_every=5",
    "--config.train.tensorboard=False",
    "--config.train.plots=False",
    "--config.checkpoint.every_steps=5",
]


def _worker(tmp_path, study: str, trials: int, steps: int, *extra: str) -> subprocess.Popen:
    space = tmp_path / "space.py"
    space.write_text(SPACE)
    return subprocess.Popen(
        [
            sys.executable,
            "scripts/tune.py",
            *TINY,
            f"--config.train.num_steps={steps}",
            f"--space={space}",
            f"--study={study}",
            f"--storage=sqlite:///{tmp_path / 'tune.db'}",
            f"--trials={trials}",
            f"--workdir={tmp_path / 'runs'}",
            "--sampler_seed=0",
            *extra,
        ],
        cwd=REPO,
        env=_env(1),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return out


def _study(tmp_path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'tune.db'}")


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """Three trials by two workers at once on one SQLite file: the study and their output."""
    tmp_path = tmp_path_factory.mktemp("tune")
    workers = [_worker(tmp_path, "two", 3, 20) for _ in range(2)]
    outputs = [_finish(w) for w in workers]
    return tmp_path, outputs


def test_two_workers_share_one_study(searched):
    tmp_path, outputs = searched
    study = _study(tmp_path, "two")
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) >= 3 and all(t.state.name in ("COMPLETE", "PRUNED") for t in finished)
    assert all(o.count("trial ") >= 1 for o in outputs)  # both workers ran trials
    for trial in study.trials:
        workdir = trial.user_attrs["workdir"]
        report = (
            json.loads(
                (tmp_path / "runs" / "two" / workdir.split("/")[-1] / "report.json").read_text()
            )
            if trial.state.name == "COMPLETE"
            else None
        )
        if report is not None:
            assert trial.value == pytest.approx(report["val_rmse"])
        assert trial.intermediate_values  # reported at every evaluation, for the pruner
    best = study.best_trial
    assert f"(best {best.value:.3f}, trial {best.number})" in "".join(outputs)


def test_no_trial_sees_a_test_score_until_final_scores_the_best_once(searched):
    tmp_path, outputs = searched
    study = _study(tmp_path, "two")
    for trial in study.trials:
        keys = [*trial.user_attrs, *trial.system_attrs, *trial.params]
        assert not [k for k in keys if "test" in k]
        run = tmp_path / "runs" / "two" / trial.user_attrs["workdir"].split("/")[-1]
        assert "test_" not in (run / "metrics.jsonl").read_text()
        if (run / "report.json").exists():
            assert "test" not in json.loads((run / "report.json").read_text())
    assert "test_rmse" not in "".join(outputs)
    out = _finish(_worker(tmp_path, "two", 3, 20, "--final"))
    line = next(ln for ln in out.splitlines() if ln.startswith("final: "))
    final = json.loads(line.removeprefix("final: "))
    assert final["trial"] == study.best_trial.number and final["test"]["count"] == 100
    stored = json.dumps([[t.user_attrs, t.system_attrs] for t in _study(tmp_path, "two").trials])
    assert f"{final['test']['rmse']}"[:8] not in stored
    again = _finish(_worker(tmp_path, "two", 3, 20, "--final"))
    assert line in again.splitlines()  # recorded once, read back, not scored again


def test_a_killed_worker_leaves_the_study_usable_and_a_rerun_completes_it(tmp_path):
    proc = _worker(tmp_path, "killed", 1, 150, "--heartbeat_s=1")
    run = tmp_path / "runs" / "killed" / "trial-0000"
    deadline = time.monotonic() + 180
    # Killed once its first checkpoint is committed (Orbax renames a finished step's directory
    # to the bare step number).
    while not (run / "checkpoints").is_dir() or not any(
        p.name.isdigit() for p in (run / "checkpoints").iterdir()
    ):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(2.5)  # past the grace period of two missed heartbeats
    _finish(_worker(tmp_path, "killed", 1, 150, "--heartbeat_s=1"))
    study = _study(tmp_path, "killed")
    states = [t.state.name for t in study.trials]
    assert states == ["FAIL", "COMPLETE"]  # the killed trial, then its retry
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retried) == 1 and retried[0].user_attrs["workdir"].endswith("trial-0000")
    report = json.loads((run / "report.json").read_text())
    assert report["resumed_from_step"] >= 5  # the retry resumed the killed trial's checkpoint


def test_a_space_key_the_config_lacks_is_refused_not_added():
    from pdm_jax import tuning
    from pdm_jax.errors import ConfigError
    from tests.conftest import load_config

    config = load_config("cnn_bilstm")
    with pytest.raises(ConfigError, match=r"space: config\.train\.learnig_rate"):
        tuning.with_overrides(config, {"train.learnig_rate": 1e-3})
    before = config.train.eval_every
    tuned = tuning.with_overrides(config, {"train.eval_every": 7})
    assert tuned.checkpoint.every_steps == 14 and config.train.eval_every == before != 7
