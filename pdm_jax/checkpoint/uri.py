"""Where a store lives: the URI schemes it accepts and the packages each one needs.

Why a module of its own: the store, the Azure backend and callers that only resolve a location
(prediction, resume) all need these, and none of them should have to import the others for it.
"""

from __future__ import annotations

import importlib
import os

from pdm_jax.errors import ConfigError

SCHEMES = ("file", "gs", "s3", "az")
# (module, pip package) each remote scheme needs at runtime; all are in the `cloud` extra.
CLOUD_PACKAGES = {
    "gs": (("gcsfs", "gcsfs"),),
    "s3": (("s3fs", "s3fs"),),
    "az": (("azure.storage.blob", "azure-storage-blob"),),
}


def scheme_of(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


def resolve_uri(uri: str | None, workdir: str) -> str:
    """The store's location: `uri`, else `<workdir>/checkpoints`; local paths made absolute."""
    if not uri:
        return os.path.abspath(os.path.join(workdir, "checkpoints"))
    if uri.startswith("file://"):
        return os.path.abspath(uri[len("file://") :])
    scheme = scheme_of(uri)
    if scheme not in SCHEMES:
        raise ConfigError(
            f"config.checkpoint.uri: scheme {scheme}:// is not supported (supported: a local "
            f"path, file://, gs://, s3://, az://), got {uri!r}"
        )
    if scheme == "file":
        return os.path.abspath(uri)
    bucket = uri.split("://", 1)[1].split("/", 1)[0]
    if not bucket:
        raise ConfigError(
            f"config.checkpoint.uri: {uri!r} names no bucket (expected {scheme}://BUCKET/PREFIX)"
        )
    return uri.rstrip("/")


def require_packages(scheme: str) -> None:
    """One line naming the missing package and the extra, instead of a deep ImportError later."""
    for module, package in CLOUD_PACKAGES.get(scheme, ()):
        try:
            importlib.import_module(module)
        except ImportError:
            raise ConfigError(
                f'{scheme}:// checkpoints need the {package} package: pip install "pdm-jax[cloud]"'
            ) from None
