"""download_cmapss against a real local HTTP server serving a zip shaped like NASA's."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import pathlib
import re
import subprocess
import sys
import threading
import zipfile

import pytest

from pdm_jax.data import cmapss, download
from pdm_jax.errors import DataError
from tests.conftest import MissingData, find_test_data, load_config

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
ALL_FILES = [name for subset in cmapss.SUBSETS for name in cmapss.subset_files(subset)]


@pytest.fixture(scope="module")
def originals(cmapss_dir) -> dict[str, bytes]:
    """The real files (read-only: never written to)."""
    return {name: (cmapss_dir / name).read_bytes() for name in ALL_FILES}


def _nasa_zip(files: dict[str, bytes]) -> bytes:
    """Outer zip > CMAPSSData.zip > 12 text files + readme, as NASA publishes it."""
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("readme.txt", b"Data Set: FD001 ... (test copy)\n")
        for name, data in files.items():
            zf.writestr(name, data)
    outer = io.BytesIO()
    with zipfile.ZipFile(outer, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("CMAPSSData.zip", inner.getvalue())
    return outer.getvalue()


class _Server:
    """Serves named byte blobs; records every request path so tests can assert no download."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.requests: list[str] = []
        handler = functools.partial(_Handler, self)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


class _Handler(http.server.BaseHTTPRequestHandler):
    def __init__(self, server_state: _Server, *args, **kwargs) -> None:
        self.state = server_state
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        self.state.requests.append(self.path)
        body = self.state.blobs.get(self.path.lstrip("/"))
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def server(originals: dict[str, bytes]):
    srv = _Server()
    srv.blobs["good.zip"] = _nasa_zip(originals)
    corrupted = dict(originals)
    data = bytearray(corrupted["RUL_FD003.txt"])
    data[0] = ord("9") if data[0] != ord("9") else ord("8")
    corrupted["RUL_FD003.txt"] = bytes(data)
    srv.blobs["corrupt.zip"] = _nasa_zip(corrupted)
    srv.blobs["missing.zip"] = _nasa_zip(
        {k: v for k, v in originals.items() if k != "test_FD004.txt"}
    )
    srv.blobs["notazip.zip"] = b"<html>this is not a zip</html>"
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def dest(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "cache" / "cmapss"


def _assert_untouched(dest: pathlib.Path) -> None:
    assert not dest.exists() or not any(dest.iterdir()), sorted(dest.iterdir())
    leftovers = list(dest.parent.glob(".cmapss-download-*"))
    assert not leftovers, leftovers


def test_downloads_all_subsets_then_skips_the_network(server, originals, dest):
    out = download.download_cmapss(dest, url=server.url("good.zip"), progress=False)
    assert out == dest
    assert sorted(p.name for p in dest.iterdir()) == sorted(ALL_FILES)
    for name in ALL_FILES:
        data = (dest / name).read_bytes()
        assert data == originals[name], name
        assert hashlib.sha256(data).hexdigest() == cmapss.SHA256[name]
    assert not list(dest.parent.glob(".cmapss-download-*"))
    hits = len(server.requests)

    assert download.download_cmapss(dest, url=server.url("good.zip"), progress=False) == dest
    assert len(server.requests) == hits


def test_single_subset_downloads_only_its_files(server, dest):
    download.download_cmapss(dest, url=server.url("good.zip"), subsets=("FD001",), progress=False)
    assert sorted(p.name for p in dest.iterdir()) == sorted(cmapss.subset_files("FD001"))


def test_replaces_a_damaged_local_copy(server, originals, dest):
    dest.mkdir(parents=True)
    (dest / "RUL_FD001.txt").write_bytes(b"stale\n")
    hits = len(server.requests)
    download.download_cmapss(dest, url=server.url("good.zip"), subsets=("FD001",), progress=False)
    assert len(server.requests) == hits + 1
    assert (dest / "RUL_FD001.txt").read_bytes() == originals["RUL_FD001.txt"]


def test_checksum_mismatch_writes_nothing(server, dest):
    with pytest.raises(DataError) as err:
        download.download_cmapss(dest, url=server.url("corrupt.zip"), progress=False)
    message = str(err.value)
    assert "RUL_FD003.txt" in message and "sha256" in message
    assert "\n" not in message
    _assert_untouched(dest)


def test_http_404_is_one_line_error(server, dest):
    url = server.url("nope.zip")
    with pytest.raises(DataError, match="404") as err:
        download.download_cmapss(dest, url=url, progress=False)
    assert url in str(err.value) and "\n" not in str(err.value)
    _assert_untouched(dest)


def test_missing_member_is_named(server, dest):
    with pytest.raises(DataError, match=re.escape("test_FD004.txt")) as err:
        download.download_cmapss(dest, url=server.url("missing.zip"), progress=False)
    assert "\n" not in str(err.value)
    _assert_untouched(dest)


def test_not_a_zip(server, dest):
    with pytest.raises(DataError, match="not a valid zip"):
        download.download_cmapss(dest, url=server.url("notazip.zip"), progress=False)
    _assert_untouched(dest)


def test_unknown_subset_is_rejected_before_downloading(server, dest):
    hits = len(server.requests)
    with pytest.raises(DataError, match="FD009"):
        download.download_cmapss(dest, url=server.url("good.zip"), subsets=("FD009",))
    assert len(server.requests) == hits
    _assert_untouched(dest)


def test_progress_goes_to_stderr(server, dest, capsys):
    download.download_cmapss(dest, url=server.url("good.zip"), subsets=("FD001",), progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "downloading good.zip" in captured.err and "MB" in captured.err


def _run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "scripts/download_cmapss.py", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_script_end_to_end(server, dest):
    ok = _run_script("--dest", str(dest), "--url", server.url("good.zip"), "--subsets=FD002")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == str(dest)
    assert sorted(p.name for p in dest.iterdir()) == sorted(cmapss.subset_files("FD002"))

    bad = _run_script("--dest", str(dest.parent / "other"), "--url", server.url("nope.zip"))
    assert bad.returncode == 2
    assert bad.stderr.startswith("error:")
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "Traceback" not in bad.stderr
    _assert_untouched(dest.parent / "other")


def test_training_data_path_downloads_a_missing_subset_into_the_cache(
    server, tmp_path, monkeypatch
):
    """config.data.download: a subset found nowhere is fetched into the user cache, then used."""
    from pdm_jax.data import sources

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cfg = load_config().data
    cfg.subset = "FD003"
    cfg.download_url = server.url("good.zip")
    data = sources.load(cfg)
    assert data.train.num_units == 100 and data.test.num_units == 100
    cached = sorted(p.name for p in cmapss.cache_dir().iterdir())
    assert cached == sorted(cmapss.subset_files("FD003"))
    cfg.subset = "FD002"
    cfg.download = False
    with pytest.raises(DataError, match="C-MAPSS FD002 not found"):
        sources.load(cfg)


def test_the_tests_find_their_data_as_documented(server, cmapss_dir, tmp_path):
    """$PDM_DATA_DIR, then the sibling directory, then the user cache, then a checked download
    into the cache; a directory counts only with all 12 files."""
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "train_FD001.txt").write_bytes((cmapss_dir / "train_FD001.txt").read_bytes())
    cache, nowhere = tmp_path / "cache", tmp_path / "nowhere"
    dead = server.url("nope.zip")
    assert find_test_data(str(cmapss_dir), nowhere, cache, url=dead) == cmapss_dir
    assert find_test_data(str(partial), cmapss_dir, cache, url=dead) == cmapss_dir
    assert find_test_data(None, partial, cmapss_dir, url=dead) == cmapss_dir
    assert not cache.exists()
    assert find_test_data(None, nowhere, cache, url=server.url("good.zip")) == cache
    assert sorted(p.name for p in cache.iterdir()) == sorted(ALL_FILES)
    with pytest.raises(MissingData) as err:
        find_test_data(str(partial), nowhere, tmp_path / "empty", url=dead)
    message = str(err.value)
    assert "\n" not in message and "set $PDM_DATA_DIR to a directory" in message
    for where in (str(partial), str(nowhere), str(tmp_path / "empty"), dead):
        assert where in message
