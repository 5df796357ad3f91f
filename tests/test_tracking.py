"""MLflow tracking against a real `mlflow server` on 127.0.0.1 and a local `sqlite:///` store.

Runs are in-process and tiny (the loop, not the model, is under test). What a user's tracking
server must show: the params, every metrics.jsonl number at its step, tags, the run's files and
plots; a resumed run (same workdir, or another one resuming from the checkpoint store) continues
the same MLflow run; a dead server costs one warning and nothing else.
"""

import json
import logging
import os
import sys
import uuid
from pathlib import Path

import pytest

from pdm_jax import configuration, resources, training
from pdm_jax.errors import ConfigError
from tests.conftest import tiny_cnn_config
from tests.servers import HOST, StorageServer, free_port

mlflow = pytest.importorskip("mlflow", reason="the [test] extra installs mlflow")


class MlflowServer(StorageServer):
    """`mlflow server` with a SQLite backend, serving artifacts from a local directory."""

    name = "mlflow server"
    probe_path = "/health"
    start_timeout_s = 90.0  # imports MLflow's whole server stack; slow on a busy 2-core machine

    def _process_env(self) -> dict[str, str]:
        # No background job runners (six huey consumer processes): the tests run no MLflow jobs.
        return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

    def _command(self) -> list[str]:
        return [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.workdir / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.workdir / "artifacts"),
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    yield server
    server.stop()


def _config(uri: str, steps: int, plots: bool = False):
    cfg = tiny_cnn_config()
    cfg.data.window = 10
    cfg.train.update(num_steps=steps, batch_size=32, eval_every=5, log_every=5, warmup_steps=1)
    cfg.train.update(tensorboard=False, plots=plots, patience=0)
    cfg.checkpoint.every_steps = 5
    cfg.tracking.mlflow_uri = uri
    cfg.tracking.experiment = "tiny"
    return cfg


def _records(*workdirs: Path) -> list[dict]:
    return [
        json.loads(line)
        for workdir in workdirs
        for line in (workdir / "metrics.jsonl").read_text().splitlines()
    ]


def _assert_metrics_equal(client, run_id: str, records: list[dict]) -> None:
    """Every number of every record is in MLflow at its step, and MLflow holds nothing else.
    Test scores are the exception: metrics.jsonl keeps the latest run's, MLflow every finished
    run's (each at the step it finished on)."""
    expected: dict[str, dict[int, float]] = {}
    for record in records:
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                expected.setdefault(key, {})[record["step"]] = float(value)
    run = client.get_run(run_id)
    assert set(run.data.metrics) == set(expected)
    for key, by_step in expected.items():
        history = client.get_metric_history(run_id, key)
        logged = {m.step: m.value for m in history}
        assert len(history) == len(logged), f"{key}: a step logged twice"
        if key.startswith("test_"):
            logged = {step: logged[step] for step in by_step}
        assert logged == pytest.approx(by_step), key


def test_runs_log_to_a_server_and_resumed_runs_continue_the_same_mlflow_run(
    mlflow_server, tmp_path, monkeypatch
):
    uri = mlflow_server.endpoint
    # Credentials from the standard variables (the server has no auth and ignores them).
    secrets = [f"pdm-secret-{uuid.uuid4().hex}" for _ in range(2)]
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secrets[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secrets[1])
    first, elsewhere = tmp_path / "first", tmp_path / "elsewhere"
    training.train_and_evaluate(_config(uri, 10), str(first))
    info = json.loads((first / "run_info.json").read_text())
    run_id = info["tracking"]["mlflow_run_id"]
    # The same workdir, longer (a resumable change): the same MLflow run continues.
    training.train_and_evaluate(_config(uri, 15), str(first))
    # Another machine's workdir resuming from this run's checkpoints (as from s3://).
    cfg = _config(uri, 20, plots=True)
    cfg.checkpoint.resume_from = str(first / "checkpoints")
    report = training.train_and_evaluate(cfg, str(elsewhere))
    assert report["resumed_from_step"] == 15

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert json.loads((elsewhere / "run_info.json").read_text())["tracking"]["mlflow_run_id"] == (
        run_id
    )
    assert run.data.params["train.batch_size"] == "32"
    assert run.data.params["model.name"] == "cnn_bilstm"
    assert run.data.tags["model"] == "cnn_bilstm" and run.data.tags["subset"] == "FD001"
    assert run.data.tags["platform"].startswith("cpu x1")
    assert "grad_accum" in run.data.tags["layout"] and "git_commit" in run.data.tags
    _assert_metrics_equal(client, run_id, _records(first, elsewhere))
    assert run.data.metrics["test_rmse"] == pytest.approx(report["test"]["rmse"])
    assert run.data.metrics["host_rss_mb"] > 0 and run.data.metrics["steps_per_s"] > 0
    names = {f.path for f in client.list_artifacts(run_id)}
    assert {"config.json", "run_info.json", "report.json", "plots"} <= names
    plots = {Path(f.path).name for f in client.list_artifacts(run_id, "plots")}
    assert plots and plots == {p.name for p in (elsewhere / "plots").iterdir()}
    # No credential in params, tags, logged files or the run directories.
    logged = [*run.data.params.values(), *run.data.tags.values()]
    for name in ("config.json", "run_info.json", "report.json"):
        logged.append(Path(client.download_artifacts(run_id, name, str(tmp_path))).read_text())
    logged += [p.read_text() for p in tmp_path.rglob("*.json*") if p.is_file()]
    for secret in secrets:
        assert not any(secret in text for text in logged)


def test_a_local_sqlite_store_keeps_metrics_and_files_beside_the_database(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the current directory
    database = tmp_path / "db" / "mlflow.db"
    database.parent.mkdir()
    uri = f"sqlite:///{database}"
    workdir = tmp_path / "run"
    training.train_and_evaluate(_config(uri, 5), str(workdir))
    client = mlflow.MlflowClient(uri)
    run_id = json.loads((workdir / "run_info.json").read_text())["tracking"]["mlflow_run_id"]
    _assert_metrics_equal(client, run_id, _records(workdir))
    assert (database.parent / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()
    assert {f.path for f in client.list_artifacts(run_id)} >= {"config.json", "report.json"}


def test_a_dead_server_costs_one_warning_and_nothing_else(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    workdir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="pdm_jax.tracking"):
        report = training.train_and_evaluate(
            _config(f"http://{HOST}:{free_port()}", 10), str(workdir)
        )
    warnings = [r for r in caplog.records if r.name == "pdm_jax.tracking"]
    assert len(warnings) == 1 and "metrics stay in metrics.jsonl" in warnings[0].getMessage()
    assert report["steps"] == 10 and "test" in report
    assert [r["step"] for r in _records(workdir) if "loss" in r] == [5, 10]
    assert "tracking" not in json.loads((workdir / "run_info.json").read_text())


def test_a_tracking_uri_with_a_password_is_refused():
    cfg = _config("https://alice:s3cret@mlflow.example.com", 5)
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_PASSWORD") as caught:
        configuration.validate(cfg)
    assert "s3cret" not in str(caught.value)
    configuration.validate(_config("https://mlflow.example.com", 5))


def test_resource_readings_take_the_fullest_device():
    class Device:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            return self.stats

    mb = 1 << 20
    busy = Device({"bytes_in_use": 300 * mb, "peak_bytes_in_use": 500 * mb})
    quiet = Device({"bytes_in_use": 100 * mb, "peak_bytes_in_use": 900 * mb})
    sample = resources.sample([busy, quiet])
    assert sample["device_mem_mb"] == 300 and sample["device_peak_mb"] == 900
    assert sample["host_rss_mb"] > 50  # this interpreter with jax loaded
    assert set(resources.sample([Device(None)])) == {"host_rss_mb"}  # XLA:CPU reports nothing
