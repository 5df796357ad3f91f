"""Real object-storage servers on 127.0.0.1 for checkpoint tests: S3 (moto), GCS, Azure (Azurite).

Why real servers and not mocks: Orbax reaches storage through two independent clients, TensorStore
(C++, its own HTTP stack) and etils.epath -> fsspec (s3fs/gcsfs/adlfs). Patching either one in
Python proves nothing about the other, and only a server on a socket can be stopped mid-save.

Why the fixtures fail instead of skipping: a storage test that silently skips on a machine
without Node.js or without network access proves nothing, so a server that cannot be installed
or started fails the test with the tail of its log.

Register the fixtures with ``pytest_plugins = ["tests.servers"]`` (a test module or the top
conftest). Each server starts at most once per session, on first request, and stops at session
end. Client environment variables are never set for the whole session: use the function-scoped
``s3_env``/``gcs_env``/``azure_env`` fixtures or ``with server.environ(): ...``.

What ``stop()`` + ``start()`` (same port) does to the data:

- S3: moto keeps everything in memory, so a new process starts empty. To behave like S3 after an
  outage, the server runs with moto's request recorder on, and a restart replays every recorded
  mutating request (PUT/POST/DELETE; multipart upload ids are remapped) into the new process
  before it serves anyone else. A request that reached the server before it died is replayed even
  if its client never saw the answer, like a real S3 write that landed before the connection
  dropped. Not replayed: requests sent with ``Transfer-Encoding: chunked`` (moto's recorder stores
  no body for them) and anything that names a version id.
- GCS: the emulator runs on disk (not ``--in-memory``) and is stopped with SIGINT, which lets the
  request in progress finish, so everything it acknowledged survives. ``stop(kill=True)`` may
  leave its single metadata file half-written; the next start then fails with its log.
- Azure: Azurite stores blobs under ``--location`` and saves its metadata database when stopped
  with SIGTERM, so everything survives. ``stop(kill=True)`` can lose the last seconds of
  metadata (LokiJS autosave).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import fcntl
import http.client
import importlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import pytest

__all__ = [
    "AzuriteServer",
    "GcsEmulatorServer",
    "MotoS3Server",
    "StorageServer",
    "azure_env",
    "azure_server",
    "clear_client_caches",
    "gcs_env",
    "gcs_server",
    "s3_env",
    "s3_server",
]

HOST = "127.0.0.1"
# Generous for a cold CI runner (moto imports ~1-2 s here); a healthy start takes well under this.
START_TIMEOUT_S = float(os.environ.get("PDM_TEST_SERVER_START_TIMEOUT", "30"))
STOP_TIMEOUT_S = 10.0
# A first Azurite install downloads ~50 packages from npm; kept apart from START_TIMEOUT_S.
NPM_INSTALL_TIMEOUT_S = float(os.environ.get("PDM_TEST_NPM_INSTALL_TIMEOUT", "300"))
AZURITE_SPEC = "azurite@3"
# Azurite's fixed development account: public, documented by Microsoft, not a secret.
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
GCS_PROJECT = "test-project"
LOG_TAIL_LINES = 60

_live: set[StorageServer] = set()


def free_port() -> int:
    """A port nobody listens on now; the small race until the server binds it is accepted."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def clear_client_caches() -> None:
    """Forget cached fsspec/epath filesystems so the next one reads the current environment.

    s3fs, gcsfs and adlfs read their endpoint and credentials from the environment only when an
    instance is built; fsspec keeps instances keyed on constructor arguments (not on the
    environment) and etils.epath keeps one per protocol in an lru_cache. Without this, a test
    that switches endpoints keeps talking to the old one.
    """
    import fsspec

    # Only classes already imported: importing gcsfs here would fix its class choice
    # (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT is read at import) before environ() sets the flag.
    for protocol in ("s3", "s3a", "gcs", "gs", "az", "abfs"):
        if protocol in fsspec.registry:
            fsspec.registry[protocol].clear_instance_cache()
    with contextlib.suppress(ImportError, AttributeError):
        from etils.epath import backend

        type(backend.fsspec_backend)._get_filesystem.cache_clear()


def _answers_http(
    port: int, path: str, timeout: float, headers: dict[str, str] | None = None
) -> bool:
    """Any HTTP status counts: the probe asks whether the server is up, not whether it agrees."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        conn.getresponse().read()
        return True
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


class StorageServer:
    """One server process on a fixed port that can be stopped and started again in place."""

    name = "server"
    scheme = ""
    # Probed until the server answers; chosen so the probe changes no state.
    probe_path = "/"
    stop_signal = signal.SIGTERM
    start_timeout_s = START_TIMEOUT_S
    # Variables removed inside environ() because they would steer clients elsewhere.
    unset_vars: tuple[str, ...] = ()

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log_path = workdir / "server.log"
        self.start_seconds: list[float] = []
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _process_env(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self) -> None:
        """Start on self.port and wait until it answers; a no-op when already running."""
        if self.running:
            return
        command = self._command()
        began = time.monotonic()
        with self.log_path.open("ab") as log:
            number = len(self.start_seconds) + 1
            log.write(f"\n=== start #{number}: {' '.join(command)}\n".encode())
            log.flush()
            try:
                self._proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.workdir,
                    env=self._process_env(),
                )
            except OSError as err:
                self._fail(f"could not run {command[0]}: {err}")
        _live.add(self)
        self._wait_until_answering()
        self.start_seconds.append(time.monotonic() - began)

    def _wait_until_answering(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                self._fail(f"exited with code {code} before answering")
            if _answers_http(self.port, self.probe_path, timeout=2.0):
                return
            if time.monotonic() > deadline:
                self.stop(kill=True)
                self._fail(f"did not answer within {self.start_timeout_s:.0f} s")
            time.sleep(0.1)

    def stop(self, kill: bool = False) -> None:
        """Stop the process; kill=True is a crash (SIGKILL), otherwise a clean shutdown."""
        proc, self._proc = self._proc, None
        _live.discard(self)
        if proc is None or proc.poll() is not None:
            return
        if kill:
            proc.kill()
        else:
            proc.send_signal(self.stop_signal)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log written)"
        return "\n".join(text.splitlines()[-lines:])

    def _fail(self, reason: str) -> None:
        pytest.fail(
            f"{self.name} on {self.endpoint} {reason}\n"
            f"--- last lines of {self.log_path} ---\n{self.log_tail()}",
            pytrace=False,
        )

    @contextlib.contextmanager
    def environ(self) -> Iterator[dict[str, str]]:
        """Point clients at this server for the duration of the block, then restore."""
        try:
            with pytest.MonkeyPatch.context() as patch:
                for name in self.unset_vars:
                    patch.delenv(name, raising=False)
                for name, value in self.env.items():
                    patch.setenv(name, value)
                self._patch_client_config(patch)
                clear_client_caches()
                yield self.env
        finally:
            clear_client_caches()  # after the restore, so no instance outlives its environment

    def _patch_client_config(self, patch: pytest.MonkeyPatch) -> None:
        """Hook for settings that clients read once at import, not from the environment."""

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name by default) and return its URL."""
        name = name or f"t-{uuid.uuid4().hex[:12]}"
        self._create_bucket(name)
        return f"{self.scheme}://{name}"

    def _create_bucket(self, name: str) -> None:
        raise NotImplementedError


class MotoS3Server(StorageServer):
    """moto's S3 server, run through this file's launcher so that a restart keeps the data."""

    name = "S3 server (moto)"
    scheme = "s3"
    probe_path = "/moto-api/"
    unset_vars = (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_ENDPOINT_URL_S3",
    )

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        super().__init__(workdir, port)
        self.recording: Path | None = None

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            # botocore reads the region from AWS_DEFAULT_REGION, other SDKs from AWS_REGION.
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
            # A developer's ~/.aws files could name another endpoint or profile.
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def _command(self) -> list[str]:
        previous = self.recording
        self.recording = self.workdir / f"recording-{len(self.start_seconds) + 1}.jsonl"
        self.recording.unlink(missing_ok=True)
        # -P keeps tests/ (whose data/ and models/ could shadow packages) off the server's path.
        command = [sys.executable, "-P", __file__, "moto-s3", str(self.port), str(self.recording)]
        if previous is not None and previous.exists():
            command.append(str(previous))
        return command

    def start(self, keep_data: bool = True) -> None:
        """keep_data=False starts empty, as plain moto_server would after any restart."""
        if self.running:
            return
        old = self.recording
        if not keep_data:
            self.recording = None  # _command replays whatever self.recording names
        try:
            super().start()
        except BaseException:
            self.recording = old  # a failed start may have replayed only part of it
            raise
        # The new recording holds the replayed history (or a fresh start), so the old is spent.
        if old is not None and old != self.recording:
            old.unlink(missing_ok=True)

    def _create_bucket(self, name: str) -> None:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        client.create_bucket(Bucket=name)


class GcsEmulatorServer(StorageServer):
    """gcp-storage-emulator on disk, so that data survives a clean restart.

    Run through this file's launcher, which adds the `x-goog-generation` header that real GCS
    sends with every object download and the emulator leaves out. TensorStore takes an object's
    generation from that header; without it a read reports generation 0, and the conditional
    write OCDBT then makes on a manifest fails with "Malformed StorageGeneration" (now and then,
    whenever OCDBT re-reads a manifest instead of using its cache).
    """

    name = "GCS emulator (gcp-storage-emulator)"
    scheme = "gs"
    stop_signal = signal.SIGINT  # its main loop turns SIGINT into a graceful shutdown
    probe_path = f"/storage/v1/b?project={GCS_PROJECT}"
    unset_vars = ("FSSPEC_GCS_TOKEN",)

    @property
    def env(self) -> dict[str, str]:
        return {
            "STORAGE_EMULATOR_HOST": self.endpoint,
            "TENSORSTORE_GCS_HTTP_URL": self.endpoint,
            "GOOGLE_CLOUD_PROJECT": GCS_PROJECT,
            # gcsfs 2026.10 otherwise probes each bucket for zonal/HNS support and logs
            # hundreds of "default credentials were not found" warnings.
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }

    def _command(self) -> list[str]:
        data = str(self.workdir / "data")
        port = str(self.port)
        # -P keeps tests/ (whose data/ and models/ could shadow packages) off the server's path.
        launcher = [sys.executable, "-P", __file__, "gcs-emulator"]
        return [*launcher, "--data-dir", data, "start", "--host", HOST, "--port", port]

    def _patch_client_config(self, patch: pytest.MonkeyPatch) -> None:
        import fsspec.config
        import gcsfs  # imported now, a first import sees GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false

        # fsspec copies FSSPEC_GCS_TOKEN into its config when imported; token=anon makes gcsfs
        # talk gRPC/TLS to the plain-HTTP emulator and hang for 60 s per call.
        gcs_config = fsspec.config.conf.get("gcs", {})
        if "token" in gcs_config:
            patch.delitem(gcs_config, "token")
        # gcsfs imported earlier with the flag unset registered its zonal/HNS-probing subclass,
        # which logs a credentials warning per bucket against the emulator and then falls back
        # to the plain class anyway; register the plain class directly. fsspec offers no public
        # way to restore a registry entry, hence its private dict.
        if gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem:
            registry = importlib.import_module("fsspec.registry")._registry
            for protocol in ("gcs", "gs"):
                patch.setitem(registry, protocol, gcsfs.core.GCSFileSystem)

    def _create_bucket(self, name: str) -> None:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=30)
        try:
            conn.request(
                "POST",
                f"/storage/v1/b?project={GCS_PROJECT}",
                body=json.dumps({"name": name}),
                headers={"Content-Type": "application/json"},
            )
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status != 200:
            raise RuntimeError(f"creating gs://{name} failed: {response.status} {body[:500]!r}")


def node_prefix() -> Path:
    """Outside the repo and outside $XDG_CACHE_HOME (tests repoint that per test)."""
    configured = os.environ.get("PDM_TEST_NODE_PREFIX")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "pdm-jax-test" / "azurite"


def ensure_azurite(prefix: Path) -> Path:
    """Install Azurite with npm once per machine; a file lock serialises parallel sessions."""
    binary = prefix / "node_modules" / ".bin" / "azurite-blob"
    marker = prefix / ".pdm-jax-installed"

    def installed() -> bool:
        return binary.exists() and marker.exists() and marker.read_text() == AZURITE_SPEC

    if installed():
        return binary
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("npm not found on PATH: Azure tests need Node.js >= 18 with npm", pytrace=False)
    prefix.mkdir(parents=True, exist_ok=True)
    log_path = prefix / "npm-install.log"
    with (prefix / ".install.lock").open("w") as lock:
        deadline = time.monotonic() + NPM_INSTALL_TIMEOUT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"timed out waiting for another Azurite install in {prefix}", pytrace=False
                    )
                time.sleep(0.5)
        if installed():
            return binary
        command = [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund"]
        with log_path.open("wb") as log:
            try:
                code = subprocess.run(
                    [*command, AZURITE_SPEC],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=max(1.0, deadline - time.monotonic()),
                    check=False,
                ).returncode
            except subprocess.TimeoutExpired:
                code = None
        if code != 0 or not binary.exists():
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
            reason = "timed out" if code is None else f"exited with code {code}"
            pytest.fail(
                f"npm install {AZURITE_SPEC} into {prefix} {reason}\n--- {log_path} ---\n{tail}",
                pytrace=False,
            )
        marker.write_text(AZURITE_SPEC)
    return binary


class AzuriteServer(StorageServer):
    """Azurite's blob service with its data under workdir, so that a clean restart keeps it."""

    name = "Azurite blob service"
    scheme = "az"
    probe_path = f"/{AZURITE_ACCOUNT}?comp=list"  # 403 without a signature: still an answer
    unset_vars = (
        "AZURE_STORAGE_ACCOUNT_NAME",
        "AZURE_STORAGE_ACCOUNT_KEY",
        "AZURE_STORAGE_SAS_TOKEN",
        "AZURE_STORAGE_CLIENT_ID",
        "AZURE_STORAGE_TENANT_ID",
        "AZURE_STORAGE_CLIENT_SECRET",
    )

    def __init__(self, workdir: Path, binary: Path, port: int | None = None) -> None:
        super().__init__(workdir, port)
        self.binary = binary

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
            f"AccountKey={AZURITE_KEY};BlobEndpoint={self.endpoint}/{AZURITE_ACCOUNT};"
        )

    @property
    def env(self) -> dict[str, str]:
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string}

    def _command(self) -> list[str]:
        return [
            str(self.binary),
            "--blobHost",
            HOST,
            "--blobPort",
            str(self.port),
            "--location",
            str(self.workdir / "data"),
            "--skipApiVersionCheck",
            "--loose",
            # Without it Azurite logs DNS errors for its telemetry host on offline machines.
            "--disableTelemetry",
        ]

    def _create_bucket(self, name: str) -> None:
        from azure.storage.blob import BlobServiceClient

        BlobServiceClient.from_connection_string(self.connection_string).create_container(name)


@atexit.register
def _stop_leftovers() -> None:
    """Backstop for a session that ends without fixture teardown (e.g. an internal error)."""
    for server in list(_live):
        server.stop(kill=True)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3Server]:
    server = MotoS3Server(tmp_path_factory.mktemp("s3-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsEmulatorServer]:
    server = GcsEmulatorServer(tmp_path_factory.mktemp("gcs-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def azure_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzuriteServer]:
    binary = ensure_azurite(node_prefix())
    server = AzuriteServer(tmp_path_factory.mktemp("azure-server"), binary)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server: MotoS3Server) -> Iterator[MotoS3Server]:
    """s3_server with its client env set for this test (restarted if a test left it stopped)."""
    s3_server.start()
    with s3_server.environ():
        yield s3_server


@pytest.fixture
def gcs_env(gcs_server: GcsEmulatorServer) -> Iterator[GcsEmulatorServer]:
    """gcs_server with its client env set for this test (restarted if a test left it stopped)."""
    gcs_server.start()
    with gcs_server.environ():
        yield gcs_server


@pytest.fixture
def azure_env(azure_server: AzuriteServer) -> Iterator[AzuriteServer]:
    """azure_server with its client env set for this test (restarted if a test left it stopped)."""
    azure_server.start()
    with azure_server.environ():
        yield azure_server


# --- S3 launcher: runs in the server process (``python -P tests/servers.py moto-s3 ...``) ---

_REPLAYED_METHODS = frozenset({"PUT", "POST", "DELETE"})
_UPLOAD_ID = re.compile(rb"<UploadId>([^<]+)</UploadId>")
_REPLAY_HEADER = "X-Pdm-Jax-Replay"
# Recomputed by http.client for the body it sends, or meaningless for a replay.
_DROPPED_HEADERS = frozenset({"content-length", "transfer-encoding", "expect", "x-pdm-jax-replay"})


def _read_recording(path: Path) -> list[dict]:
    """moto appends one JSON object per request; parallel requests can misplace the newlines
    and a killed server can leave a torn last entry, so decode objects back to back instead of
    by line and stop at the first one that does not parse."""
    text = path.read_text()
    decoder = json.JSONDecoder()
    whitespace = re.compile(r"\s*")
    entries: list[dict] = []
    position = whitespace.match(text, 0).end()  # type: ignore[union-attr]
    while position < len(text):
        try:
            entry, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            break
        entries.append(entry)
        position = whitespace.match(text, position).end()  # type: ignore[union-attr]
    return entries


def _replay(port: int, entries: list[dict]) -> tuple[int, int]:
    """Send the recorded mutating requests again, in order; returns (sent, failed)."""
    # A replayed CreateMultipartUpload gets a new upload id; the recording still names the old
    # one, so map each unknown old id to the oldest unclaimed new id for the same key.
    unclaimed: dict[str, deque[str]] = defaultdict(deque)
    renamed: dict[str, str] = {}
    sent = failed = 0
    for entry in entries:
        method = entry.get("method", "")
        if method not in _REPLAYED_METHODS:
            continue
        url = urlsplit(entry["url"])
        query = parse_qsl(url.query, keep_blank_values=True)
        old_id = dict(query).get("uploadId")
        if old_id is not None:
            if old_id not in renamed and unclaimed[url.path]:
                renamed[old_id] = unclaimed[url.path].popleft()
            new_id = renamed.get(old_id, old_id)
            query = [(k, new_id if k == "uploadId" else v) for k, v in query]
            target = f"{url.path}?{urlencode(query, quote_via=quote, safe='')}"
        else:
            target = f"{url.path}?{url.query}" if url.query else url.path
        body = entry.get("body") or ""
        data = base64.b64decode(body) if entry.get("body_encoded") else body.encode()
        headers = {
            k: v for k, v in entry.get("headers", {}).items() if k.lower() not in _DROPPED_HEADERS
        }
        headers[_REPLAY_HEADER] = "1"
        conn = http.client.HTTPConnection(HOST, port, timeout=60)
        try:
            conn.request(method, target, body=data, headers=headers)
            response = conn.getresponse()
            answer = response.read()
        finally:
            conn.close()
        sent += 1
        if response.status >= 300:
            failed += 1
            print(f"replay: {method} {target} -> {response.status}", flush=True)
        elif method == "POST" and any(k == "uploads" for k, _ in query):
            match = _UPLOAD_ID.search(answer)
            if match:
                unclaimed[url.path].append(match.group(1).decode())
    return sent, failed


def _moto_main(port: int, recording: str, replay_from: str | None) -> None:
    """moto_server plus recording, and a replay that finishes before other clients get in."""
    os.environ["MOTO_ENABLE_RECORDING"] = "true"
    os.environ["MOTO_RECORDER_FILEPATH"] = recording
    os.environ["MOTO_PORT"] = str(port)
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import run_simple

    app = DomainDispatcherApplication(create_backend_app)
    restored = threading.Event()

    def gated(environ: dict, start_response: Any) -> Any:
        if not restored.is_set() and environ.get("HTTP_X_PDM_JAX_REPLAY") != "1":
            restored.wait()
        return app(environ, start_response)

    def restore() -> None:
        try:
            if replay_from:
                entries = _read_recording(Path(replay_from))
                while not _answers_http(port, "/moto-api/", 1.0, {_REPLAY_HEADER: "1"}):
                    time.sleep(0.05)
                began = time.monotonic()
                sent, failed = _replay(port, entries)
                took = time.monotonic() - began
                print(
                    f"replay: {sent} requests from {replay_from} in {took:.2f} s, {failed} failed",
                    flush=True,
                )
        finally:
            restored.set()

    def exit_cleanly(signum: int, frame: object) -> None:
        sys.exit(0)

    signal.signal(signal.SIGTERM, exit_cleanly)
    signal.signal(signal.SIGINT, exit_cleanly)
    threading.Thread(target=restore, daemon=True).start()
    run_simple(HOST, port, gated, threaded=True, request_handler=MotoRequestHandler)


# --- GCS launcher: runs in the server process (``python -P tests/servers.py gcs-emulator ...``) ---


def _gcs_main(args: list[str]) -> None:
    """gcp-storage-emulator's CLI, with object downloads that carry their generation."""
    from gcp_storage_emulator.handlers import objects

    download = objects.download

    def download_with_generation(request: Any, response: Any, storage: Any, *a: Any) -> None:
        download(request, response, storage, *a)
        if response.status.value >= 300:
            return
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:  # vanished in between: the download already answered
            return
        response["x-goog-generation"] = str(obj.get("generation") or 1)
        response["x-goog-metageneration"] = str(obj.get("metageneration") or 1)

    # Before the server module is imported: its routing table takes the handler from here, and
    # objects.get (alt=media) calls the module-level name.
    objects.download = download_with_generation
    from gcp_storage_emulator.__main__ import main

    sys.exit(main(args))


if __name__ == "__main__":
    if sys.argv[1:2] == ["moto-s3"]:
        _moto_main(int(sys.argv[2]), sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
    elif sys.argv[1:2] == ["gcs-emulator"]:
        _gcs_main(sys.argv[2:])
    else:
        sys.exit(
            f"usage: {sys.argv[0]} moto-s3 PORT RECORDING [REPLAY_FROM] | gcs-emulator ARGS..."
        )
