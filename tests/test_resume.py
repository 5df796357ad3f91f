"""Exact resume from local checkpoints, across real crashes, stop signals and layout changes.

Every run here is a real `python -m pdm_jax.main` subprocess: a process boundary is the point.
The reference is one uninterrupted run; interrupted ones must end bit-identical to it on the
same layout, and on a different device count continue with the same losses to float tolerance.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import fsspec
import jax
import numpy as np
import pytest

from pdm_jax import checkpoint
from pdm_jax.checkpoint.owner import RECORD
from tests.conftest import REPO, TINY_RUN_FLAGS, as_format_1
from tests.test_parallel import _env, _free_port, _losses

pytest_plugins = ["tests.servers"]

STEPS = 60
TINY = [*TINY_RUN_FLAGS, "--config.train.log_every=1"]


def _start(workdir, steps: int = STEPS, devices: int = 1, extra=()) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pdm_jax.main",
            *TINY,
            f"--workdir={workdir}",
            f"--config.train.num_steps={steps}",
            *extra,
        ],
        cwd=REPO,
        env=_env(devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _run(workdir, steps: int = STEPS, devices: int = 1, extra=()) -> dict:
    proc = _start(workdir, steps, devices, extra)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return json.loads((workdir / "report.json").read_text())


def _wait_for_step(proc: subprocess.Popen, workdir, step: int) -> None:
    """Polls metrics.jsonl until the run has logged `step` (or fails if the run ended first)."""
    path = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        if path.exists() and any(
            json.loads(ln).get("step", 0) >= step
            for ln in path.read_text().splitlines()[-3:]
            if ln.endswith("}")
        ):
            return
        time.sleep(0.005)
    pytest.fail("timed out waiting for the run")


def _interrupt(workdir, at_step: int, sig: signal.Signals, extra=()) -> str:
    """Starts a run, sends `sig` once it has logged `at_step`, waits for the exit: its output.
    SIGKILL must kill it; a stop signal must end it with exit code 0 after its save."""
    proc = _start(workdir, extra=extra)
    _wait_for_step(proc, workdir, at_step)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 0), out[-3000:]
    return out


@pytest.fixture(scope="module")
def reference_workdir(tmp_path_factory):
    """One uninterrupted run of STEPS steps (read-only for the tests: copy it to change it)."""
    workdir = tmp_path_factory.mktemp("reference")
    _run(workdir)
    return workdir


@pytest.fixture(scope="module")
def reference(reference_workdir):
    return json.loads((reference_workdir / "report.json").read_text()), _losses(reference_workdir)


def test_three_sigkills_on_gs_then_reruns_end_bit_identical(tmp_path, reference_workdir, gs_bucket):
    """scripts/soak.py with 3 kills (its documented runs use 10, on local disk and s3://): each
    kill leaves its owner record, each rerun takes it over and resumes, and the end is the
    uninterrupted run's: checkpoint bytes, meta, metrics.jsonl once per step, losses."""
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/soak.py",
            f"--workdir={tmp_path / 'soak'}",
            "--kills=3",
            "--seed=1",
            f"--steps={STEPS}",
            f"--checkpoint_uri={gs_bucket}",
            f"--reference={reference_workdir}",
            "--",
            *TINY,
        ],
        cwd=REPO,
        env=_env(1),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["ok"] and all(summary["checks"].values()), summary
    assert len(summary["kills"]) == 3 and summary["store"] == gs_bucket
    assert not os.path.exists(os.path.join(tmp_path, "soak", "run", RECORD))


# One direction is enough here: restoring onto another mesh is the same code both ways, and
# test_parallel checks that 1 and 8 devices train the same.
@pytest.mark.parametrize(("first", "second"), [(8, 1)])
def test_resume_on_another_device_count_continues_the_same_run(tmp_path, reference, first, second):
    _, ref_losses = reference
    _run(tmp_path, steps=30, devices=first)
    report = _run(tmp_path, steps=STEPS, devices=second)
    assert report["resumed_from_step"] == 30 and report["layout"]["mesh"] == [second, 1]
    np.testing.assert_allclose(_losses(tmp_path), ref_losses, rtol=2e-4)


def test_store_round_trip_is_bitwise(tmp_path):
    state = {
        "params": {"w": np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)},
        "opt_state": (np.int32(7), {"mu": np.arange(5, dtype=np.float32)}),
    }
    meta = {"data": {"next_batch": 12}, "note": "x"}
    store = checkpoint.CheckpointStore(str(tmp_path / "c"))
    store.save(3, state, meta, {"val_rmse": 1.5})
    store.close()
    again = checkpoint.CheckpointStore(str(tmp_path / "c"))
    target = jax.tree.map(jax.numpy.asarray, state)
    restored, restored_meta = again.restore(target)
    assert restored_meta["data"] == {"next_batch": 12} and restored_meta["step"] == 3
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


@pytest.fixture
def gs_bucket(gcs_env) -> str:
    """A fresh `gs://bucket/run` on the GCS emulator, its client variables in os.environ (which
    the training subprocesses inherit, as a user's shell would pass them)."""
    return gcs_env.make_bucket() + "/run"


def _unique_s3_secret(monkeypatch) -> None:
    """Makes the S3 secret unique so a test can look for it anywhere (moto takes any)."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", f"pdm-secret-{uuid.uuid4().hex}")


def _secrets() -> list[str]:
    """The credentials in the environment that must never be written anywhere."""
    found = [os.environ.get("AWS_SECRET_ACCESS_KEY", "")]
    for part in os.environ.get("AZURE_STORAGE_CONNECTION_STRING", "").split(";"):
        if part.startswith("AccountKey="):
            found.append(part.removeprefix("AccountKey="))
    return [s for s in found if len(s) > 8]


def _stored_bytes(uri: str) -> bytes:
    """Every object under `uri`, read by a client of its own."""
    from tests.servers import clear_client_caches  # imported by pytest_plugins, rewritten

    clear_client_caches()
    fs = fsspec.filesystem(uri.split("://", 1)[0], skip_instance_cache=True)
    return b"".join(fs.cat_file(path) for path in fs.find(uri.split("://", 1)[1]))


def _assert_no_secrets_written(logs: str, workdir, uris: list[str], expected: int) -> None:
    """Credentials reach neither the logs, nor the run directory, nor the checkpoints."""
    written = logs + "".join(path.read_text() for path in workdir.rglob("*.json*"))
    stored = b"".join(_stored_bytes(uri) for uri in uris)
    assert stored.count(b'"format_version"') >= len(uris)  # the reader sees every store's metadata
    secrets = _secrets()
    assert len(secrets) == expected
    for secret in secrets:
        assert secret not in written and secret.encode() not in stored


def test_on_s3_sigterm_saves_its_step_a_bad_config_is_refused_and_the_rerun_ends_bit_identical(
    tmp_path, reference, s3_env
):
    """Checks 3, 8 and 4 on one remote backend, in sequence on one store: a stop signal saves
    the step it was in; a run with another config is refused in one line naming the keys, and
    leaves the store as it was; the rerun continues from the saved step and ends bit-identical
    to the uninterrupted run."""
    ref_report, ref_losses = reference
    uri = f"{s3_env.make_bucket()}/run"
    extra = [f"--config.checkpoint.uri={uri}"]
    out = _interrupt(tmp_path, 15, signal.SIGTERM, extra)
    logged = max(
        json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()
    )
    assert f"saved step {logged}" in out and not (tmp_path / "report.json").exists()
    with checkpoint.CheckpointStore(uri) as store:
        assert store.latest_step() == logged
    # The stopped run released its store and workdir; a live owner of the store refuses a run
    # from another workdir in one line before it writes anything there.
    assert not (tmp_path / RECORD).exists()
    with checkpoint.Ownership([uri]) as holder:
        second = _start(tmp_path / "second", extra=extra)
        out, _ = second.communicate(timeout=300)
        assert holder.lost is None
    assert second.returncode == 2 and out.strip().splitlines()[-1].startswith(
        f"error: {uri} is in use by {socket.gethostname()}:{os.getpid()} since "
    )
    assert not (tmp_path / "second" / RECORD).exists()
    assert not (tmp_path / "second" / "config.json").exists()

    refused = _start(
        tmp_path, extra=[*extra, "--config.train.learning_rate=0.01", "--config.seed=4"]
    )
    out, _ = refused.communicate(timeout=300)
    assert refused.returncode == 2
    assert out.strip().splitlines()[-1] == (
        f"error: checkpoint in {uri} was made with a different config; "
        "keys that differ: seed, train.learning_rate"
    )

    report = _run(tmp_path, extra=extra)
    assert report["resumed_from_step"] == logged
    assert report["params_sha256"] == ref_report["params_sha256"]
    assert _losses(tmp_path) == ref_losses


def test_two_processes_save_to_s3_then_one_process_continues_with_saves_to_azure(
    tmp_path, reference, s3_env, azure_env, monkeypatch
):
    """Trained to s3:// by two jax.distributed processes (4 devices), continued from there by
    one process on one device that saves to az://: the same run, step for step, and neither
    cloud's secret written anywhere."""
    _, ref_losses = reference
    _unique_s3_secret(monkeypatch)
    s3_uri, az_uri = s3_env.make_bucket() + "/run", azure_env.make_bucket() + "/run"
    port = _free_port()
    procs = [
        _start(
            tmp_path / "two",
            steps=30,
            devices=2,
            extra=[
                f"--config.checkpoint.uri={s3_uri}",
                f"--config.distributed.coordinator=127.0.0.1:{port}",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={i}",
                "--config.distributed.timeout_s=120",
            ],
        )
        for i in range(2)
    ]
    logs = ""
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
        logs += out
    with checkpoint.CheckpointStore(s3_uri) as store:
        assert store.all_steps() == [10, 20, 30]
    one = _start(
        tmp_path / "one",
        extra=[f"--config.checkpoint.uri={az_uri}", f"--config.checkpoint.resume_from={s3_uri}"],
    )
    out, _ = one.communicate(timeout=300)
    assert one.returncode == 0, out[-3000:]
    report = json.loads((tmp_path / "one" / "report.json").read_text())
    assert report["resumed_from_step"] == 30 and report["layout"]["mesh"] == [1, 1]
    with checkpoint.CheckpointStore(az_uri) as store:
        assert store.latest_step() == STEPS
    np.testing.assert_allclose(_losses(tmp_path / "two"), ref_losses[:30], rtol=2e-4)
    np.testing.assert_allclose(_losses(tmp_path / "one"), ref_losses[30:], rtol=2e-4)
    _assert_no_secrets_written(logs + out, tmp_path, [s3_uri, az_uri], expected=2)


def test_eval_mode_scores_the_best_checkpoint_like_the_training_run(
    tmp_path, reference, reference_workdir
):
    trained, _ = reference
    shutil.copytree(reference_workdir, tmp_path, dirs_exist_ok=True)
    proc = _start(tmp_path, extra=["--mode=eval"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["mode"] == "eval" and report["checkpoint_step"] == STEPS
    assert report["best_step"] == trained["best_step"]
    assert report["test"] == trained["test"] and report["per_unit"] == trained["per_unit"]
    assert report["val"]["rmse"] == pytest.approx(trained["val_rmse"], rel=1e-6)
    assert report["calibration"] == trained["calibration"]  # the band the checkpoint holds


def test_format_1_checkpoint_evaluates_with_a_band_fitted_again_and_resumes(
    tmp_path, reference, reference_workdir
):
    """Checkpoints from before format 2 hold no calibration: --mode=eval fits the same band
    on the validation units, and training resumes from them."""
    trained, _ = reference
    shutil.copytree(reference_workdir, tmp_path, dirs_exist_ok=True)
    as_format_1(tmp_path / "checkpoints")
    proc = _start(tmp_path, extra=["--mode=eval"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    refit = {**trained["calibration"], "source": "validation, at --mode=eval"}
    assert report["calibration"] == refit
    assert report["test"] == trained["test"] and report["per_unit"] == trained["per_unit"]
    resumed = _run(tmp_path, steps=STEPS + 10)
    assert resumed["resumed_from_step"] == STEPS and resumed["steps"] == STEPS + 10


def test_eval_mode_without_a_checkpoint_is_one_line_exit_2(tmp_path):
    proc = _start(tmp_path, extra=["--mode=eval"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert out.strip().splitlines()[-1].startswith("error: --mode=eval: no complete checkpoint in")
    assert "Traceback" not in out
