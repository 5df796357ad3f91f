"""One owner per run, on local disk, S3 (moto), GCS (emulator) and Azure (Azurite).

The records are real objects on real servers (tests/servers.py). A second claim from this very
process stands for a second run: its owner (this process) is alive on this host, which is the
case a user hits by starting the same command twice. Records of other hosts and of dead
processes are written the way such a run would have left them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from pdm_jax import training
from pdm_jax.checkpoint import CheckpointStore, InUseError, Ownership
from pdm_jax.checkpoint.owner import _backend
from pdm_jax.errors import PdmError
from tests.conftest import tiny_cnn_config

pytest_plugins = ["tests.servers"]

ENV_FIXTURE = {"s3": "s3_env", "gs": "gcs_env", "az": "azure_env"}
IN_USE = re.compile(
    r"^(?P<uri>\S+) is in use by (?P<host>[^:\s]+):(?P<pid>\d+) since "
    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(heartbeat (?P<age>\d+) s ago\)$"
)


@pytest.fixture(params=["file", *sorted(ENV_FIXTURE)])
def place(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """A fresh place a run could own: a local directory or `<scheme>://bucket/run`."""
    if request.param == "file":
        yield str(tmp_path / "run")
        return
    server = request.getfixturevalue(ENV_FIXTURE[request.param])
    yield server.make_bucket() + "/run"


def _record(place: str) -> dict | None:
    raw = _backend(place).read()
    return None if raw is None else json.loads(raw)


def _leave(place: str, **fields) -> None:
    """An owner record as another run would have left it."""
    now = time.time()
    record = {"token": "other", "host": "elsewhere", "pid": 4242, "pid_start": "1"}
    record.update({"boot_id": "", "started": now - 3600, "heartbeat": now, **fields})
    _backend(place).replace(json.dumps(record).encode())


def test_a_second_run_is_refused_naming_the_owner_and_the_record_goes_at_the_end(place):
    with Ownership([place]) as first:
        record = _record(place)
        # Who and when, nothing else: no command line, no environment, no credential.
        assert set(record) == {
            "token",
            "host",
            "pid",
            "pid_start",
            "boot_id",
            "started",
            "heartbeat",
        }
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert record["token"] == first.record["token"]
        with pytest.raises(InUseError) as refused:
            Ownership([place]).claim()
        match = IN_USE.match(str(refused.value))
        assert match, str(refused.value)
        assert match["uri"] == place and match["pid"] == str(os.getpid())
        assert match["host"] == socket.gethostname() and int(match["age"]) < 5
        assert _record(place)["token"] == first.record["token"]  # the refusal changed nothing
    assert _record(place) is None


def test_take_over_after_the_heartbeat_timeout_and_with_the_flag(place, caplog):
    _leave(place, heartbeat=time.time() - 30)
    with pytest.raises(InUseError, match=r"elsewhere:4242 since .* \(heartbeat 3\d s ago\)"):
        Ownership([place], timeout_s=60).claim()
    caplog.set_level(logging.WARNING, logger="pdm_jax.checkpoint")
    with Ownership([place], timeout_s=20) as owner:
        assert _record(place)["token"] == owner.record["token"]
    assert f"taking over {place} from elsewhere:4242: its heartbeat is 3" in caplog.text
    assert "(checkpoint.owner_timeout_s=20)" in caplog.text

    _leave(place)  # fresh heartbeat: only the flag takes over
    with Ownership([place], take_over=True) as owner:
        assert _record(place)["token"] == owner.record["token"]
    assert "from elsewhere:4242: checkpoint.take_over is set" in caplog.text
    assert _record(place) is None


def test_a_dead_process_of_this_host_is_taken_over_at_once(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    place = str(tmp_path / "run")
    _leave(place, host=socket.gethostname(), pid=dead.pid, heartbeat=time.time())
    caplog.set_level(logging.WARNING, logger="pdm_jax.checkpoint")
    with Ownership([place], timeout_s=3600):
        pass
    assert "its process is no longer running on this host" in caplog.text
    # A live pid whose start time differs is a reused pid, not the owner.
    _leave(place, host=socket.gethostname(), pid=os.getpid(), pid_start="1", heartbeat=time.time())
    with Ownership([place], timeout_s=3600):
        pass


def test_claims_all_places_or_none_and_never_removes_another_runs_record(tmp_path):
    free, taken = str(tmp_path / "workdir"), str(tmp_path / "store")
    _leave(taken)
    with pytest.raises(InUseError, match=f"^{re.escape(taken)} is in use by elsewhere:4242"):
        Ownership([free, taken]).claim()
    assert _record(free) is None and _record(taken)["token"] == "other"
    owner = Ownership([free]).claim()
    _leave(free)  # someone took it over meanwhile
    owner.release()
    assert _record(free)["token"] == "other"


def test_a_run_that_lost_its_record_knows_it(tmp_path):
    place = str(tmp_path / "run")
    owner = Ownership([place], timeout_s=0.4).claim()  # heartbeat every 0.1 s
    try:
        _leave(place)
        deadline = time.monotonic() + 10
        while owner.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert owner.lost == f"{place} was taken over by elsewhere:4242"
    finally:
        owner.release()
    assert _record(place)["token"] == "other"


def test_the_heartbeat_refreshes_the_record(tmp_path):
    place = str(tmp_path / "run")
    with Ownership([place], timeout_s=0.4):
        first = _record(place)["heartbeat"]
        time.sleep(0.35)
        assert _record(place)["heartbeat"] > first


def test_a_training_run_whose_record_is_taken_over_stops_without_saving(tmp_path):
    """In-process: at step 20's evaluation another run takes the workdir over; the heartbeat
    (every 0.25 s here) sees it, and the loop stops before step 20's save."""
    cfg = tiny_cnn_config()
    cfg.data.window = 10
    cfg.train.update(num_steps=40, batch_size=32, eval_every=10, log_every=10, patience=0)
    cfg.train.update(tensorboard=False, plots=False)
    cfg.checkpoint.update(every_steps=10, owner_timeout_s=1.0)
    workdir = tmp_path / "run"

    def take_over(step: int, rmse: float) -> None:
        if step == 20:
            _leave(str(workdir))
            time.sleep(1.0)

    with pytest.raises(PdmError) as stopped:
        training.train_and_evaluate(cfg, str(workdir), test=False, on_eval=take_over)
    assert str(stopped.value) == (
        f"{workdir} was taken over by elsewhere:4242; this run stopped at step 20 without saving it"
    )
    with CheckpointStore(str(workdir / "checkpoints"), create=False) as store:
        assert store.all_steps() == [10]
    assert _record(str(workdir))["token"] == "other"  # the new owner's record stays
    assert _record(str(workdir / "checkpoints")) is None  # this run's own is released
