"""SHA-256 of every file of a committed step, recorded after the commit and checked on restore.

Why: Orbax and TensorStore check only part of what they read back. OCDBT keeps small arrays
inside its b-tree nodes, which carry CRC-32C, but an array over 1 KiB lives in a data file with
no check at all: a flipped byte there restored silently as other values (measured on a
256x256 float32 array), so a resumed run would go on from a state nobody saved. With the sums,
such a step is unusable like a truncated one: the store warns naming it and restores the step
before.

`az://` steps are not covered here: the Azure backend's commit marker already holds each file's
size and SHA-256 and its restore checks them. A step committed without a manifest (saved before
this existed, or killed between its commit and the manifest) restores unchecked, and so does one
whose manifest cannot be read (a write cut short by a full disk): the step committed before its
manifest was written, so a damaged manifest says nothing against the step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "pdm-checksums.json"
_CHUNK = 1 << 20


def _fs(uri: str) -> tuple[Any, str]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    return fs, root.rstrip("/")


def _digest(fs: Any, path: str) -> str:
    sha = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def record(uri: str, step: int) -> None:
    """Writes `<step>/pdm-checksums.json`: {relative path: [size, sha256]} of the step's files."""
    fs, root = _fs(uri)
    base = f"{root}/{step}"
    fs.invalidate_cache(base)  # object-store clients list from a cache filled before the save
    files = {
        path[len(base) + 1 :]: [int(info["size"]), _digest(fs, path)]
        for path, info in fs.find(base, detail=True).items()
        if not path.endswith(MANIFEST)
    }
    path = f"{base}/{MANIFEST}"
    try:
        fs.pipe_file(path, json.dumps({"files": files}, indent=0).encode())
    except BaseException:
        with contextlib.suppress(Exception):  # a local file cut short by a full disk
            fs.rm_file(path)
        raise


def verify(uri: str, step: int, items: Iterable[str]) -> bool:
    """Raises CorruptStepError where a file of `items` (the step's subdirectories about to be
    read) differs from its record; False if the step has no record."""
    fs, root = _fs(uri)
    base = f"{root}/{step}"
    try:
        files = json.loads(fs.cat_file(f"{base}/{MANIFEST}"))["files"]
        sums = {rel: (int(size), str(digest)) for rel, (size, digest) in files.items()}
    except FileNotFoundError:
        return False
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning(
            "%s of step %d in %s is unreadable (%s); it restores unchecked",
            MANIFEST,
            step,
            uri,
            type(err).__name__,
        )
        return False
    prefixes = tuple(f"{item}/" for item in items)
    for rel, (size, digest) in sorted(sums.items()):
        if not rel.startswith(prefixes):
            continue
        path = f"{base}/{rel}"
        try:
            found = int(fs.size(path))
        except FileNotFoundError:
            raise CorruptStepError(f"{rel} is missing") from None
        if found != size:
            raise CorruptStepError(f"{rel} has {found} bytes where {size} were saved")
        if _digest(fs, path) != digest:
            raise CorruptStepError(f"{rel} differs from the SHA-256 recorded when it was saved")
    return True


class CorruptStepError(ValueError):
    """A committed step's bytes are not the ones saved."""
