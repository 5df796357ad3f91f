"""Smoke tests for tests/servers.py: each server stores, lists and serves back what clients write.

They go through the same clients Orbax uses (etils.epath -> fsspec for files and listings,
TensorStore for arrays), and they pin down what a restart on the same port does to the data,
because checkpoint tests stop servers mid-save and rely on that behaviour.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
import tensorstore as ts
from etils import epath

pytest.register_assert_rewrite("tests.servers")  # before the import, as pytest_plugins asks

from tests.servers import (  # noqa: E402
    AzuriteServer,
    GcsEmulatorServer,
    MotoS3Server,
    StorageServer,
    _read_recording,
    clear_client_caches,
)

pytest_plugins = ["tests.servers"]


def _roundtrip(root: str) -> None:
    """Write, read and list through epath, then list through a fresh fsspec instance."""
    base = epath.Path(root) / "smoke"
    (base / "sub").mkdir(parents=True, exist_ok=True)
    (base / "a.txt").write_text("alpha")
    (base / "sub" / "b.bin").write_bytes(b"\x00\x01beta")
    assert (base / "a.txt").read_text() == "alpha"
    assert (base / "sub" / "b.bin").read_bytes() == b"\x00\x01beta"
    assert sorted(p.name for p in base.iterdir()) == ["a.txt", "sub"]
    assert (base / "sub").is_dir()
    (base / "a.txt").unlink()
    assert not (base / "a.txt").exists()
    protocol = root.split("://", 1)[0]
    fs = fsspec.filesystem(protocol, skip_instance_cache=True)
    assert [Path(p).name for p in fs.find(f"{root}/smoke")] == ["b.bin"]


def _tensorstore_roundtrip(kvstore: dict) -> None:
    spec = {"driver": "zarr3", "kvstore": kvstore}
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    array = ts.open(spec, create=True, dtype=ts.float32, shape=data.shape).result()
    array.write(data).result()
    np.testing.assert_array_equal(ts.open(spec).result().read().result(), data)


def _restart_while_writing(server: StorageServer, root: str, kill: bool) -> list[str]:
    """Stop and restart the server while a thread keeps writing; return the acknowledged paths.

    Writes that fail or hang while the server is down are fine; a write the server acknowledged
    must still be readable after the restart.
    """
    fs = fsspec.filesystem(root.split("://", 1)[0], skip_instance_cache=True)
    acknowledged: list[str] = []
    done = threading.Event()

    def writer() -> None:
        for i in range(400):
            if done.is_set():
                return
            path = f"{root}/during-restart/{i:04d}"
            try:
                fs.pipe_file(path, path.encode())
            except Exception:  # the server is down: not acknowledged, move on
                continue
            acknowledged.append(path)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while len(acknowledged) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(acknowledged) >= 5, "the writer made no progress before the restart"
    server.stop(kill=kill)
    server.start()
    done.set()
    thread.join(timeout=120)
    assert not thread.is_alive(), "a write hung after the server came back"
    clear_client_caches()
    fresh = fsspec.filesystem(root.split("://", 1)[0], skip_instance_cache=True)
    for path in acknowledged:
        assert fresh.cat_file(path) == path.encode(), f"{path} lost in the restart"
    return acknowledged


def test_recording_reader_survives_torn_and_joined_entries(tmp_path: Path) -> None:
    recording = tmp_path / "recording.jsonl"
    # Parallel requests can put two objects on one line; a killed server leaves a torn tail.
    recording.write_text('{"method": "PUT"}{"method": "POST"}\n\n{"method": "DELETE"}\n{"meth')
    assert [e["method"] for e in _read_recording(recording)] == ["PUT", "POST", "DELETE"]


def test_server_that_cannot_start_fails_with_its_log(tmp_path: Path) -> None:
    class Broken(StorageServer):
        name = "broken server"

        def _command(self) -> list[str]:
            return [sys.executable, "-c", "print('no such storage'); raise SystemExit(3)"]

    with pytest.raises(pytest.fail.Exception, match="exited with code 3") as failure:
        Broken(tmp_path).start()
    assert "no such storage" in str(failure.value)


def test_environ_is_temporary_and_drops_cached_clients(
    s3_server: MotoS3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from etils.epath import backend

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_PROFILE", "someone-else")
    stale = backend.fsspec_backend.fs("s3://any")
    with s3_server.environ() as env:
        assert os.environ["AWS_ENDPOINT_URL"] == env["AWS_ENDPOINT_URL"] == s3_server.endpoint
        assert "AWS_PROFILE" not in os.environ
        assert backend.fsspec_backend.fs("s3://any") is not stale
    assert os.environ["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"
    assert os.environ["AWS_PROFILE"] == "someone-else"


def test_s3_files_listing_and_tensorstore(s3_env: MotoS3Server) -> None:
    bucket = s3_env.make_bucket()
    _roundtrip(bucket)
    _tensorstore_roundtrip(
        {
            "driver": "s3",
            "bucket": bucket.removeprefix("s3://"),
            "path": "array/",
            # TensorStore ignores AWS_ENDPOINT_URL: without this it hangs on real AWS.
            "endpoint": s3_env.endpoint,
            "aws_region": s3_env.env["AWS_REGION"],
        }
    )


@pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "sigkill"])
def test_s3_restart_replays_acknowledged_writes(s3_env: MotoS3Server, kill: bool) -> None:
    bucket = s3_env.make_bucket()
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    # Above one 5 MiB part: a multipart upload, whose upload id the replay has to remap.
    big = os.urandom(6 * 2**20)
    with fs.open(f"{bucket}/big.bin", "wb", block_size=5 * 2**20) as f:
        f.write(big)
    fs.pipe_file(f"{bucket}/deleted.txt", b"gone")
    fs.rm_file(f"{bucket}/deleted.txt")
    _restart_while_writing(s3_env, bucket, kill=kill)
    fresh = fsspec.filesystem("s3", skip_instance_cache=True)
    assert fresh.cat_file(f"{bucket}/big.bin") == big
    assert not fresh.exists(f"{bucket}/deleted.txt")


def test_gcs_files_listing_and_tensorstore(gcs_env: GcsEmulatorServer) -> None:
    import gcsfs

    # The plain class, whatever GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT was when gcsfs was imported.
    assert fsspec.get_filesystem_class("gcs") is gcsfs.core.GCSFileSystem
    bucket = gcs_env.make_bucket()
    _roundtrip(bucket)
    _tensorstore_roundtrip(
        {"driver": "gcs", "bucket": bucket.removeprefix("gs://"), "path": "array/"}
    )


def test_gcs_restart_keeps_acknowledged_writes(gcs_env: GcsEmulatorServer) -> None:
    bucket = gcs_env.make_bucket()
    epath.Path(f"{bucket}/before.txt").write_text("kept")
    _restart_while_writing(gcs_env, bucket, kill=False)
    assert epath.Path(f"{bucket}/before.txt").read_text() == "kept"


def test_azure_files_and_listing(azure_env: AzuriteServer) -> None:
    _roundtrip(azure_env.make_bucket())


def test_azure_restart_keeps_data(azure_env: AzuriteServer) -> None:
    # Not written to during the restart, unlike S3 and GCS: azure-storage-blob retries a failed
    # request after a 15 s initial backoff (its ExponentialRetry default), which adlfs does not
    # let callers change, so an in-flight write costs ~18 s.
    container = azure_env.make_bucket()
    epath.Path(f"{container}/before.txt").write_text("kept")
    azure_env.stop()
    azure_env.start()
    clear_client_caches()
    assert epath.Path(f"{container}/before.txt").read_text() == "kept"
    assert [p.name for p in epath.Path(container).iterdir()] == ["before.txt"]


def test_s3_start_without_keep_data_is_empty(s3_env: MotoS3Server) -> None:
    bucket = s3_env.make_bucket()
    epath.Path(f"{bucket}/x.txt").write_text("x")
    s3_env.stop()
    s3_env.start(keep_data=False)
    clear_client_caches()
    assert not fsspec.filesystem("s3").exists(bucket)
