"""Data parallelism: the same global batch gives the same training on 1 device, 8 simulated
devices, accumulated microbatches, and two real processes joined by jax.distributed."""

import json
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from pdm_jax import models, parallel
from pdm_jax.data import dataset
from pdm_jax.models import layers
from pdm_jax.training import steps
from tests.conftest import REPO, tiny_cnn_config

TINY_CNN = [
    "--config=configs/cnn_bilstm.py",
    "--config.model.cnn_bilstm.channels=(16,)",
    "--config.model.cnn_bilstm.dilations=(1,)",
    "--config.model.cnn_bilstm.lstm_hidden=16",
    "--config.model.cnn_bilstm.dense=16",
    "--config.train.batch_size=64",
    "--config.train.num_steps=20",
    "--config.train.log_every=1",
    "--config.train.eval_every=10",
    "--config.train.tensorboard=False",
    "--config.train.plots=False",
]


def _env(devices: int) -> dict[str, str]:
    env = os.environ.copy()
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env["PYTHONPATH"] = str(REPO)
    return env


def _losses(workdir) -> list[float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    return [r["loss"] for r in records if "loss" in r]


def _main(args: list[str], devices: int, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pdm_jax.main", *args],
        cwd=REPO,
        env=_env(devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def test_one_device_and_eight_devices_train_the_same(tmp_path):
    one, eight = tmp_path / "one", tmp_path / "eight"
    _finish(_main([*TINY_CNN, f"--workdir={one}"], devices=1))
    log = _finish(_main([*TINY_CNN, f"--workdir={eight}"], devices=8))
    assert "(8, 1)" in log  # the auto layout used all eight devices on the data axis
    info = json.loads((eight / "run_info.json").read_text())
    assert info["layout"]["mesh_shape"] == [8, 1]
    report = json.loads((eight / "report.json").read_text())
    assert report["layout"]["per_device_batch"] == 8
    a, b = _losses(one), _losses(eight)
    assert len(a) == len(b) == 20
    np.testing.assert_allclose(a, b, rtol=2e-4)
    assert a[0] != a[-1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_on_loopback_hold_identical_parameters(tmp_path):
    port = _free_port()
    procs = [
        _main(
            [
                *TINY_CNN,
                "--config.train.num_steps=12",
                "--config.train.eval_every=2",
                # Only time-based saves, due at every step: the processes must agree on them
                # (every SYNC_EVERY steps) or one would enter a save the other never joins.
                "--config.checkpoint.every_steps=0",
                "--config.checkpoint.every_minutes=1e-6",
                # One run directory and checkpoint store for both, as on a shared filesystem.
                f"--workdir={tmp_path / 'run'}",
                f"--config.distributed.coordinator=127.0.0.1:{port}",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={i}",
                "--config.distributed.timeout_s=120",
            ],
            devices=2,
        )
        for i in range(2)
    ]
    logs = [_finish(p) for p in procs]
    digests = [re.findall(r"params sha256 ([0-9a-f]{64})", log) for log in logs]
    assert digests[0] and digests[0] == digests[1], logs
    # Process 0 writes the run directory; the mesh spans both processes' devices.
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["layout"]["processes"] == 2 and report["layout"]["mesh"] == [4, 1]
    assert report["params_sha256"] == digests[0][-1]
    assert len(_losses(tmp_path / "run")) == 12
    # Time-based saves at the agreed steps (training.loop.SYNC_EVERY), then the final one.
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints"), key=int) == ["10", "12"]


def _tiny_setup():
    cfg = tiny_cnn_config(dropout=0.0)
    prepared = dataset.prepare(cfg.data, cfg.seed)
    spec = layers.spec_from_config(cfg.model, len(prepared.scaler.features), cfg.data.window)
    graphdef, params = models.split(models.build(spec))
    return prepared, spec, graphdef, params


def test_microbatches_are_strided_so_no_data_moves_between_devices():
    x = np.arange(12)
    parts = steps.microbatches({"x": x}, 3)["x"]
    np.testing.assert_array_equal(parts, [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]])


@pytest.mark.parametrize("accum", [2, 4])
def test_gradient_accumulation_makes_the_same_update(accum):
    prepared, spec, graphdef, params = _tiny_setup()
    optimizer = optax.sgd(0.1)
    batch = steps.train_arrays(prepared.train.gather(np.arange(64)))
    mesh = parallel.make_mesh((1, 1), jax.devices()[:1])
    results = []
    for a in (1, accum):
        step = steps.make_train_step(graphdef, spec, optimizer, mesh, grad_accum=a)
        p = parallel.replicate(params, mesh)
        p, _, out = step(p, optimizer.init(p), batch, 0)
        results.append((float(out["loss"]), parallel.to_host(p)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_mesh_of_the_wrong_size_names_the_key():
    from pdm_jax.errors import ConfigError

    with pytest.raises(ConfigError, match=r"config\.compute\.mesh"):
        parallel.make_mesh((4, 1), jax.devices()[:1])


# Predictions of one batch of 128 windows by a small TFT (the model chunked by default): whole on
# 1 device, and in chunks of 4 windows per device on 1 and on 8 devices; printed as the largest
# difference from the whole-batch prediction, plus the number of loops in each lowered step.
CHUNKED_PREDICT = r"""
import json
import jax
import numpy as np
from pdm_jax import models, parallel, prediction
from pdm_jax.data import dataset
from pdm_jax.models import layers
from pdm_jax.training import steps
from tests.conftest import load_config

cfg = load_config("common")  # the plain TFT: 14 sensor inputs
cfg.model.tft.hidden, cfg.model.tft.heads, cfg.model.tft.var_hidden = 8, 2, 4
prepared = dataset.prepare(cfg.data, cfg.seed)
batch = steps.host_arrays(prepared.val.gather(np.arange(128)))
result = {}
for name, model_cfg in (("tft", cfg.model),):
    spec = layers.spec_from_config(model_cfg, 14, cfg.data.window)
    graphdef, params = models.split(models.build(spec))
    preds = {}
    for devices, chunk in ((1, 0), (1, 4), (8, 4)):
        mesh = parallel.make_mesh((devices, 1), jax.devices()[:devices])
        placed = jax.device_put(batch, parallel.batch_sharding(mesh))
        step = prediction.make_predict_step(graphdef, spec, mesh, microbatch=chunk)
        p = parallel.replicate(params, mesh)
        lowered = step.lower(p, placed)
        result[f"{name} {devices}x{chunk} loops"] = lowered.as_text().count("stablehlo.while")
        preds[f"{devices}x{chunk}"] = np.asarray(lowered.compile()(p, placed)["pred"])
    for key, value in preds.items():
        result[f"{name} {key}"] = float(np.abs(value - preds["1x0"]).max())
print(json.dumps(result))
"""


def test_chunked_prediction_is_the_whole_batch_prediction_on_one_and_eight_devices():
    """config.compute.infer_microbatch only changes how a batch is computed, never the result."""
    proc = subprocess.run(
        [sys.executable, "-c", CHUNKED_PREDICT],
        cwd=REPO,
        env=_env(8),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("tft",):
        for key in ("1x4", "8x4"):
            assert result[f"{name} {key}"] < 1e-4, (name, key, result)
            # Chunks of 4 per device (32 chunks on 1 device, 4 on 8): one more loop than the
            # model's own scans.
            assert result[f"{name} {key} loops"] == result[f"{name} 1x0 loops"] + 1, result


def test_chunked_batches_are_multiples_of_the_chunks():
    from pdm_jax.training import evaluation

    assert evaluation.eval_batch_size(100, 1, 32) == 128  # 4 chunks of 32
    assert evaluation.eval_batch_size(20, 1, 32) == 20  # one chunk's worth: run it whole
    assert evaluation.eval_batch_size(5000, 8, 32) == 1024
    assert evaluation.eval_batch_size(300, 8, 32) == 512
    assert evaluation.eval_batch_size(300, 8, 0) == 304
