"""CheckpointStore on object storage: S3 (moto), GCS (emulator), Azure (Azurite), and local disk.

Every remote test talks to a real server on 127.0.0.1 (tests/servers.py), because the store
reaches storage through three independent clients (TensorStore, fsspec, the Azure SDK) and only
a server on a socket can be stopped in the middle of a save. Clients are configured the way a
user would: the standard variables (AWS_ENDPOINT_URL, STORAGE_EMULATOR_HOST,
AZURE_STORAGE_CONNECTION_STRING), nothing passed to the store.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

pytest.register_assert_rewrite("tests.servers")  # before the import, as pytest_plugins asks

from pdm_jax import checkpoint  # noqa: E402
from pdm_jax.checkpoint import CheckpointStore, checksums  # noqa: E402
from pdm_jax.checkpoint import s3 as orbax_s3  # noqa: E402
from pdm_jax.errors import ConfigError, PdmError  # noqa: E402
from tests.servers import AZURITE_KEY, StorageServer, clear_client_caches  # noqa: E402

pytest_plugins = ["tests.servers"]

# A failed Orbax save or restore closes its event loop while TensorStore still holds futures
# of the aborted call; when those finish, TensorStore's callback hits the closed loop and Python
# reports it as unraisable. Expected on the failure paths these tests provoke, nowhere else.
on_failure_paths = pytest.mark.filterwarnings(
    "ignore:Exception ignored in:pytest.PytestUnraisableExceptionWarning"
)

ENV_FIXTURE = {"s3": "s3_env", "gs": "gcs_env", "az": "azure_env"}
META = {
    "data": {"next_batch": 12, "epoch": 1},
    "early_stopping": {"best_rmse": 1.25, "best_step": 2, "stale": 0},
    "config": {"model": {"name": "tft", "dims": [8, 16]}, "seed": 3},
    "fingerprint": "ab" * 16,
}


def tiny_state(seed: int = 0, rows: int = 8) -> dict[str, Any]:
    """Params, an optax-like (count, moments) tuple and best params; float32, bfloat16, int32."""
    rng = np.random.default_rng(seed)

    def params() -> dict[str, Any]:
        return {
            "dense": {
                "kernel": rng.normal(size=(rows, 16)).astype(np.float32),
                "bias": rng.normal(size=(16,)).astype(jnp.bfloat16),
            }
        }

    return {
        "params": params(),
        "opt_state": (np.int32(7 + seed), {"mu": params(), "nu": params()}),
        "best_params": params(),
    }


def as_target(state: Any) -> Any:
    return jax.tree.map(jnp.asarray, state)


def assert_bitwise(restored: Any, expected: Any) -> None:
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True):
        got, want = np.asarray(got), np.asarray(want)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()


def full_meta(step: int) -> dict[str, Any]:
    return {**META, "format_version": checkpoint.FORMAT_VERSION, "step": step}


def stored_steps(uri: str) -> set[int]:
    """Step directories that hold any object, listed by a client of its own (not the store's)."""
    clear_client_caches()
    fs = fsspec.filesystem(uri.split("://", 1)[0], skip_instance_cache=True)
    root = fs._strip_protocol(uri).rstrip("/") + "/"
    return {
        int(rel.split("/", 1)[0])
        for rel in (path[len(root) :] for path in fs.find(root))
        if rel.split("/", 1)[0].isdigit()
    }


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.fixture(params=sorted(ENV_FIXTURE))
def remote(request: pytest.FixtureRequest) -> Iterator[tuple[StorageServer, str]]:
    """(server with its client variables set, a fresh `<scheme>://bucket/run` URI)."""
    server: StorageServer = request.getfixturevalue(ENV_FIXTURE[request.param])
    yield server, server.make_bucket() + "/run"


def test_round_trip_is_bitwise_with_only_the_standard_variables(
    remote: tuple[StorageServer, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, uri = remote
    if server.scheme == "gs":
        # Users set STORAGE_EMULATOR_HOST; TensorStore's own variable must not be needed.
        monkeypatch.delenv("TENSORSTORE_GCS_HTTP_URL")
    state = tiny_state()
    assert checkpoint.resolve_uri(uri + "/", "unused") == uri
    with CheckpointStore(uri) as store:
        began = time.monotonic()
        assert store.save(3, state, META, {"val_rmse": 1.5})
        assert time.monotonic() - began < 5
        assert store.wait()
        assert store.latest_step() == 3 and store.all_steps() == [3]
    with CheckpointStore(uri, create=False) as again:
        assert again.latest_step() == 3
        restored, meta = again.restore(as_target(state))
        assert meta == full_meta(3)
        assert_bitwise(restored, state)
        assert again.restore_meta(3) == meta
    assert stored_steps(uri) == {3}


def test_retention_keeps_the_last_two_and_the_best_across_a_restart(
    remote: tuple[StorageServer, str],
) -> None:
    _, uri = remote
    state = tiny_state()
    with CheckpointStore(uri, keep=2) as store:
        for step, rmse in [(1, 5.0), (2, 1.0), (3, 4.0), (4, 3.0), (5, 2.0)]:
            assert store.save(step, state, META, {"val_rmse": rmse})
        assert store.wait()
        assert store.all_steps() == [2, 4, 5]
    assert stored_steps(uri) == {2, 4, 5}
    # A new process still knows step 2 is the best one (its metrics are stored with it).
    with CheckpointStore(uri, keep=2) as store:
        assert store.all_steps() == [2, 4, 5]
        assert store.save(6, state, META) and store.wait()
        assert store.all_steps() == [2, 5, 6]
    assert stored_steps(uri) == {2, 5, 6}


@on_failure_paths
def test_storage_outage_mid_save_is_a_warning_and_the_next_save_works(
    remote: tuple[StorageServer, str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, uri = remote
    # TensorStore gives up after one quick retry here instead of ~15 s (the production bound,
    # checked in test_orbax_patch_...); the file stays fast, the failure path is the same.
    monkeypatch.setattr(
        orbax_s3, "RETRIES", {"max_retries": 1, "initial_delay": "0.1s", "max_delay": "0.1s"}
    )
    # 8 MiB: long enough in flight on these local servers that the stop lands mid-save.
    state = tiny_state(rows=128 * 1024)
    caplog.set_level(logging.WARNING)
    store = CheckpointStore(uri, keep=2, save_wait_s=1.0, probe_s=2.0)
    try:
        assert store.save(1, state, META) and store.wait()
        began = time.monotonic()
        assert store.save(2, state, META)
        assert time.monotonic() - began < 5
        server.stop()
        # The loop goes on: the next save neither raises nor waits for the failing one.
        began = time.monotonic()
        assert store.save(3, state, META) is False
        assert time.monotonic() - began < 5
        if server.scheme == "az":
            # The upload would be retried into a restarted server: let it fail while down.
            assert store.wait(timeout_s=120) is False  # failed in the background, not raised
            server.start()
        else:
            # gs/s3: save() itself talks to the storage, so it checks it first, bounded.
            began = time.monotonic()
            assert store.save(4, state, META) is False
            assert time.monotonic() - began < 5
            # The array writes failed for good while it was down; the server is back before
            # the fsspec clients give up on their metadata writes (~8 s s3fs, ~30 s gcsfs).
            server.start()
            assert store.wait(timeout_s=120) is False  # saves 3 and 4 failed after step 2
        # Step 2 either failed (its array writes hit the outage) or, when its arrays were all
        # written before the stop (seen on gs on a quiet machine), completed once the server
        # was back (gcsfs retries its metadata writes for ~30 s): never anything in between.
        survivor = store.latest_step()
        assert survivor in (1, 2)
        assert store.save(5, state, META) and store.wait()
        assert store.all_steps() == [survivor, 5]
    finally:
        store.close()
    messages = warnings_of(caplog)
    failed = any(m.startswith("checkpoint step 2 could not be written") for m in messages)
    assert failed is (survivor == 1)
    assert any(m.startswith("checkpoint step 3 skipped") for m in messages)
    for secret in (AZURITE_KEY, server.env.get("AWS_SECRET_ACCESS_KEY", AZURITE_KEY)):
        assert secret not in caplog.text
    # Nothing committed was lost and no half-written step became visible.
    with CheckpointStore(uri, create=False) as fresh:
        assert fresh.all_steps() == [survivor, 5]
        restored, meta = fresh.restore(as_target(state), survivor)
        assert meta["step"] == survivor
        assert_bitwise(restored, state)
    # The next writer clears what the failed save left behind.
    with CheckpointStore(uri, keep=2) as writer:
        assert writer.save(6, tiny_state(), META) and writer.wait()
    assert stored_steps(uri) == {5, 6}


@pytest.fixture(params=["local", "s3", "az"])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "checkpoints")
    server: StorageServer = request.getfixturevalue(ENV_FIXTURE[request.param])
    return server.make_bucket() + "/run"


def _two_steps(store_uri: str, rows: int = 8) -> tuple[dict[str, Any], Any, str]:
    """Steps 1 and 2 saved: (step 1's state, the store's fsspec filesystem, its root path)."""
    first, second = tiny_state(seed=1, rows=rows), tiny_state(seed=2, rows=rows)
    with CheckpointStore(store_uri) as store:
        store.save(1, first, META)
        store.save(2, second, META)
        assert store.wait()
    fs, root = fsspec.core.url_to_fs(store_uri)
    return first, fs, root


@on_failure_paths
def test_a_damaged_latest_step_falls_back_to_the_one_before(
    store_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    first, fs, root = _two_steps(store_uri)
    data_files = fs.find(f"{root}/2/state/d")
    assert data_files
    for path in data_files:  # truncated, as by an upload cut short
        fs.pipe_file(path, fs.cat_file(path)[:10])
    caplog.set_level(logging.WARNING)
    with CheckpointStore(store_uri, create=False) as again:
        assert again.restore_meta()["step"] == 2  # the meta item itself is intact
        restored, meta = again.restore(as_target(first), 2)
        assert meta == full_meta(1)
        assert_bitwise(restored, first)
        warning = next(m for m in warnings_of(caplog) if "step 2" in m)
        assert "unusable" in warning and "trying step 1" in warning
        if store_uri.startswith("az://"):
            assert "is 10 bytes, expected" in warning  # checked against the commit marker
        # With step 1 damaged too (a file deleted) nothing is usable: one line, no traceback.
        fs.rm_file(f"{root}/1/meta/metadata")
        with pytest.raises(PdmError) as failure:
            again.restore(as_target(first))
    message = str(failure.value)
    assert message.startswith(f"no usable checkpoint in {store_uri}: step 2: ")
    assert "; step 1: " in message and "\n" not in message


@on_failure_paths
def test_a_flipped_byte_in_the_latest_step_is_found_and_the_one_before_restored(
    store_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Arrays over 1 KiB live in OCDBT data files that nothing checks (small ones sit in its
    CRC-checked b-tree nodes): a flipped byte there restored silently as other values. The
    SHA-256 sums recorded after each commit (on az://, the commit marker's) catch it."""
    first, fs, root = _two_steps(store_uri, rows=1024)  # 64 KiB arrays
    path = max(fs.find(f"{root}/2/state"), key=fs.size)
    data = bytearray(fs.cat_file(path))
    data[len(data) // 2] ^= 0x10
    fs.pipe_file(path, bytes(data))
    caplog.set_level(logging.WARNING)
    with CheckpointStore(store_uri, create=False) as again:
        assert again.restore_meta()["step"] == 2  # the meta item is intact and still reads
        restored, meta = again.restore(as_target(first))
    assert meta == full_meta(1)
    assert_bitwise(restored, first)
    warning = next(m for m in warnings_of(caplog) if "step 2" in m)
    assert "unusable" in warning and "trying step 1" in warning
    expected = "SHA-256" if store_uri.startswith("az://") else "differs from the SHA-256"
    assert expected in warning, warning


def test_a_manifest_cut_short_leaves_its_step_restorable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The manifest is written after the commit, so a full disk can cut it short while the step
    itself is complete: the step restores (unchecked, with a warning), and is not passed over
    for the one before as a damaged step would be."""
    uri = str(tmp_path / "checkpoints")
    _, _, root = _two_steps(uri)
    manifest = Path(root) / "2" / checksums.MANIFEST
    manifest.write_bytes(manifest.read_bytes()[:40])
    caplog.set_level(logging.WARNING)
    with CheckpointStore(uri, create=False) as again:
        restored, meta = again.restore(as_target(tiny_state(seed=2)))
    assert meta == full_meta(2)
    assert_bitwise(restored, tiny_state(seed=2))
    assert any("unreadable" in m and "restores unchecked" in m for m in warnings_of(caplog))


def test_resolve_uri_accepts_object_stores_and_names_the_config_key_otherwise() -> None:
    for uri in ("s3://bucket/run", "gs://bucket/a/b", "az://container/run", "s3://bucket"):
        assert checkpoint.resolve_uri(uri, "/w") == uri
    assert checkpoint.resolve_uri("file:///tmp/x", "/w") == "/tmp/x"
    assert checkpoint.resolve_uri(None, "/w") == "/w/checkpoints"
    with pytest.raises(ConfigError, match=r"^config\.checkpoint\.uri: scheme hdfs:// is not"):
        checkpoint.resolve_uri("hdfs://nn/ckpt", "/w")
    with pytest.raises(ConfigError, match=r"^config\.checkpoint\.uri: 's3:///x' names no bucket"):
        checkpoint.resolve_uri("s3:///x", "/w")


@pytest.mark.parametrize(
    ("uri", "module", "package"),
    [
        ("s3://bucket/run", "s3fs", "s3fs"),
        ("gs://bucket/run", "gcsfs", "gcsfs"),
        ("az://container/run", "azure.storage.blob", "azure-storage-blob"),
    ],
)
def test_a_missing_cloud_package_is_one_line_naming_the_extra(
    uri: str, module: str, package: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # what `import` sees when it is not installed
    with pytest.raises(ConfigError) as failure:
        CheckpointStore(uri)
    assert str(failure.value) == (
        f'{uri[:2]}:// checkpoints need the {package} package: pip install "pdm-jax[cloud]"'
    )


def test_orbax_patch_gives_tensorstore_the_users_endpoint_and_bounded_retries(
    s3_env: StorageServer,
) -> None:
    from orbax.checkpoint._src.serialization import tensorstore_utils

    # The patch replaces private Orbax functions read in this release only (pinned in
    # pyproject.toml); a new Orbax must be checked against it before the pin moves.
    assert ocp.__version__ in orbax_s3.PATCHED_ORBAX_VERSIONS
    orbax_s3.prepare("s3")
    spec = tensorstore_utils.build_kvstore_tspec("s3://bucket/run/7/state", use_ocdbt=True)
    assert spec["base"] == {
        "driver": "s3",
        "bucket": "bucket",
        "path": "run/7/state",
        "endpoint": s3_env.endpoint,  # from AWS_ENDPOINT_URL, which TensorStore ignores
        "aws_region": "us-east-1",
        "s3_request_retries": orbax_s3.RETRIES,
    }
    gcs = tensorstore_utils.build_kvstore_tspec("gs://bucket/run/7/state", use_ocdbt=True)
    assert gcs["base"]["gcs_request_retries"] == orbax_s3.RETRIES
    local = tensorstore_utils.build_kvstore_tspec(os.path.abspath("x"), use_ocdbt=True)
    assert local["base"]["driver"] == "file"
