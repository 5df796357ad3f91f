"""Fetches NASA's C-MAPSS text files into a directory, all verified or none written.

Source (`DEFAULT_URL`): NASA's public "Turbofan Engine Degradation Simulation" data set, as
published by the NASA Prognostics Center of Excellence data repository,
https://phm-datasets.s3.amazonaws.com/NASA/6.+Turbofan+Engine+Degradation+Simulation+Data+Set.zip
That zip nests a `CMAPSSData.zip` holding the 12 text files train_/test_/RUL_FD00x.txt and a
readme. The data set is a work of the US Government (public domain); cite Saxena et al., PHM08
(see shared/data/cmapss/SOURCE.md).

The zip itself is not checksummed: mirrors re-pack it. What is pinned is each text file's
sha256 (`cmapss.SHA256`), so any mirror whose files are byte-identical is accepted, and any
other content is rejected before a single byte reaches the destination. Everything is staged in
a temporary directory next to the destination (same filesystem, so the final `os.replace` of
each file is atomic) and that directory is always removed.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import pathlib
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Sequence

from pdm_jax.data import cmapss
from pdm_jax.errors import DataError

DEFAULT_URL = (
    "https://phm-datasets.s3.amazonaws.com/NASA/"
    "6.+Turbofan+Engine+Degradation+Simulation+Data+Set.zip"
)

_CHUNK = 1 << 20
# How deep zips may nest (NASA's is 2 levels); a bound so a hostile archive cannot recurse forever.
_MAX_ZIP_DEPTH = 4
_TEMP_PREFIX = ".cmapss-download-"


def sha256_of(path: str | os.PathLike) -> str:
    """Hashes in chunks so the 10 MB training files never sit in memory whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_file(path: str | os.PathLike, expected_sha256: str) -> bool:
    """True only for a regular file with exactly the pinned content; a missing file is not an
    error here because the caller's answer to both is the same: download it."""
    p = pathlib.Path(path)
    return p.is_file() and sha256_of(p) == expected_sha256.lower()


def _wanted_files(subsets: Sequence[str]) -> list[str]:
    if isinstance(subsets, str):  # "FD001" would otherwise iterate as characters
        subsets = (subsets,)
    names: list[str] = []
    for subset in dict.fromkeys(subsets):
        names.extend(cmapss.subset_files(subset))  # raises DataError for an unknown subset
    return names


def download_cmapss(
    dest: str | os.PathLike | None = None,
    url: str = DEFAULT_URL,
    subsets: Sequence[str] = cmapss.SUBSETS,
    timeout: float = 60.0,
    progress: bool = True,
) -> pathlib.Path:
    """Makes `dest` hold the requested subsets' files with their pinned sha256, and returns it.

    Does nothing (no network) when every requested file is already there and verified. Otherwise
    downloads `url`, and only when every requested file was found and verified are they moved
    into `dest`; on any failure a DataError says why and `dest` is left as it was.
    """
    dest_path = pathlib.Path(dest).expanduser() if dest is not None else cmapss.cache_dir()
    dest_path = dest_path.absolute()
    wanted = _wanted_files(subsets)
    if all(verify_file(dest_path / name, cmapss.SHA256[name]) for name in wanted):
        return dest_path

    try:
        dest_path.parent.mkdir(parents=True, exist_ok=True)
        staging = pathlib.Path(tempfile.mkdtemp(dir=dest_path.parent, prefix=_TEMP_PREFIX))
    except OSError as e:
        raise DataError(f"{dest_path}: cannot create a staging directory next to it: {e}") from e
    untouched = f"nothing was written to {dest_path}"
    try:
        archive = staging / "download.zip"
        _fetch(url, archive, timeout, progress, untouched)
        extracted = staging / "files"
        extracted.mkdir()
        _extract_verified(archive, wanted, extracted, url, untouched)
        try:
            dest_path.mkdir(parents=True, exist_ok=True)
            for name in wanted:
                os.replace(extracted / name, dest_path / name)
        except OSError as e:
            raise DataError(f"{dest_path}: cannot write the downloaded files: {e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest_path


def _one_line(reason: object) -> str:
    return " ".join(str(reason).split()) or type(reason).__name__


def _fetch(url: str, target: pathlib.Path, timeout: float, progress: bool, untouched: str) -> None:
    """Streams to disk (the zip is tens of MB) and treats a short body as a failure, since a
    truncated zip would otherwise surface later as a confusing 'bad zip'."""
    failed = f"download of {url} failed"
    meter = _Progress(url) if progress else None
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "pdm-jax-download/1"})
        with urllib.request.urlopen(request, timeout=timeout) as response, open(target, "wb") as f:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            done = 0
            while block := response.read(_CHUNK):
                f.write(block)
                done += len(block)
                if meter:
                    meter.update(done, total)
            if total is not None and done != total:
                raise DataError(
                    f"{failed}: connection closed after {done} of {total} bytes; {untouched}"
                )
    except urllib.error.HTTPError as e:
        raise DataError(f"{failed}: HTTP {e.code} {_one_line(e.reason)}; {untouched}") from e
    except urllib.error.URLError as e:
        raise DataError(f"{failed}: {_one_line(e.reason)}; {untouched}") from e
    except TimeoutError as e:
        raise DataError(f"{failed}: timed out after {timeout:g}s; {untouched}") from e
    except (OSError, http.client.HTTPException, ValueError) as e:
        # ValueError: a malformed URL ("unknown url type"); OSError: resets, disk full.
        raise DataError(f"{failed}: {_one_line(e)}; {untouched}") from e
    finally:
        if meter:
            meter.finish()


class _Progress:
    """One self-overwriting stderr line, redrawn at most ~10 times a second."""

    def __init__(self, url: str) -> None:
        self.label = url.rsplit("/", 1)[-1] or url
        self.last = 0.0
        self.drawn = False

    def update(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - self.last < 0.1 and (total is None or done < total):
            return
        self.last = now
        mb = f"{done / 1e6:.1f}"
        text = f"{mb} / {total / 1e6:.1f} MB" if total else f"{mb} MB"
        if total:
            text += f" ({100 * done // total}%)"
        sys.stderr.write(f"\rdownloading {self.label}: {text}\x1b[K")
        sys.stderr.flush()
        self.drawn = True

    def finish(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _extract_verified(
    archive: pathlib.Path, wanted: list[str], out_dir: pathlib.Path, url: str, untouched: str
) -> None:
    """Leaves in `out_dir` one verified copy of every wanted file, or raises DataError.

    Members are matched by basename at any depth of nested zips, since mirrors differ in folder
    layout; a copy with the wrong hash is remembered but the search goes on, so one stale
    duplicate does not hide a good one.
    """
    mismatched: dict[str, str] = {}
    try:
        _search_zip(archive, set(wanted), out_dir, mismatched, depth=0)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
        raise DataError(
            f"download of {url}: not a valid zip archive ({_one_line(e)}); {untouched}"
        ) from e
    except OSError as e:
        raise DataError(f"download of {url}: cannot unpack it: {_one_line(e)}; {untouched}") from e
    for name in wanted:
        if (out_dir / name).is_file():
            continue
        if name in mismatched:
            got, expected = mismatched[name][:12], cmapss.SHA256[name][:12]
            raise DataError(
                f"{name}: sha256 mismatch (got {got}…, expected {expected}…); {untouched}"
            )
        missing = [n for n in wanted if not (out_dir / n).is_file() and n not in mismatched]
        raise DataError(f"download of {url}: the archive lacks {', '.join(missing)}; {untouched}")


def _search_zip(
    path: pathlib.Path,
    wanted: set[str],
    out_dir: pathlib.Path,
    mismatched: dict[str, str],
    depth: int,
) -> None:
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if wanted <= _names(out_dir):  # all found and verified
                return
            if info.is_dir():
                continue
            base = info.filename.replace("\\", "/").rsplit("/", 1)[-1]
            # macOS zips carry AppleDouble shadows ("__MACOSX/._x.zip") that are not the files.
            if base.startswith("._") or info.filename.startswith("__MACOSX/"):
                continue
            if base in wanted and not (out_dir / base).exists():
                candidate = out_dir.parent / f"candidate-{base}"
                digest = _copy_member(zf, info, candidate)
                if digest == cmapss.SHA256[base]:
                    os.replace(candidate, out_dir / base)
                    mismatched.pop(base, None)
                else:
                    candidate.unlink()
                    mismatched.setdefault(base, digest)
            elif base.lower().endswith(".zip") and depth < _MAX_ZIP_DEPTH:
                inner = out_dir.parent / f"nested-{depth + 1}.zip"
                try:
                    _copy_member(zf, info, inner)
                    _search_zip(inner, wanted, out_dir, mismatched, depth + 1)
                finally:
                    inner.unlink(missing_ok=True)


def _names(directory: pathlib.Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def _copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: pathlib.Path) -> str:
    """Copies one member to disk and returns its sha256 (zipfile also checks the CRC)."""
    digest = hashlib.sha256()
    with zf.open(info) as src, open(target, "wb") as dst:
        for block in iter(lambda: src.read(_CHUNK), b""):
            digest.update(block)
            dst.write(block)
    return digest.hexdigest()
