"""Orbax/TensorStore on `s3://`, and bounded TensorStore retries on `s3://` and `gs://`.

Why a patch: Orbax 0.12.8 hands only `gs://` paths to a remote TensorStore driver
(`tensorstore_utils._use_gcs_driver`); any other path becomes a local `file` kvstore after
`os.path.normpath` has turned `s3://b/x` into `s3:/b/x`, and the save fails. TensorStore itself has
an `s3` driver, and Orbax's directory and metadata operations already reach S3 through
etils.epath/fsspec (s3fs), so three private functions are all that stand in the way. They are
replaced in one place (`install`), only on the Orbax release they were read in (orbax-checkpoint
is pinned to it in pyproject.toml), and `tests/test_checkpoint_remote.py` covers the result.

Why bounded retries: TensorStore's gcs and s3 drivers retry a failing request 32 times with
delays growing to 32 s, so one save against a stopped or unreachable server hangs for many
minutes. The kvstore specs built here carry `RETRIES` instead, so a failed background save is
reported within seconds and training goes on (the store skips saves while one is stuck).

Why the endpoint is resolved here: TensorStore's s3 driver ignores `AWS_ENDPOINT_URL`, while
s3fs (botocore) honours it, so without help the two halves of one checkpoint would go to
different servers. The endpoint botocore resolves (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, the
AWS config file) is passed to TensorStore whenever it is not AWS itself. Likewise TensorStore
reads only `TENSORSTORE_GCS_HTTP_URL`, so the standard `STORAGE_EMULATOR_HOST` is copied there.
"""

from __future__ import annotations

import logging
import os
import posixpath
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from pdm_jax.errors import ConfigError

log = logging.getLogger(__name__)

# The Orbax releases whose private functions `install` replaces (read in 0.12.8's
# orbax/checkpoint/_src/serialization/tensorstore_utils.py and _src/path/gcs_utils.py).
PATCHED_ORBAX_VERSIONS = ("0.12.8",)
# About 15 s of retrying (0.5 + 1 + 2 + 4 + 8) before a request counts as failed: long enough
# for a brief network blip, short enough that an outage surfaces as a warning while training runs.
RETRIES = {"max_retries": 5, "initial_delay": "0.5s", "max_delay": "8s"}

_lock = threading.Lock()
_installed = False
# Endpoint/region for TensorStore's s3 driver, set by `prepare("s3")` from botocore's view.
_s3_settings: dict[str, str] = {}
_s3_settings_key: tuple[str | None, ...] | None = None


def prepare(scheme: str) -> None:
    """Readies Orbax for a `gs://` or `s3://` store opened now (idempotent, cheap after once)."""
    if scheme == "gs":
        _map_gcs_emulator_variable()
    elif scheme == "s3":
        _resolve_s3_settings()
    install(required=scheme == "s3")


def install(required: bool = True) -> bool:
    """Replaces Orbax's kvstore-spec helpers once; False where this Orbax is not the patched one.

    `required=False` (gs://, which Orbax supports natively) only warns on another Orbax release:
    saves then work with TensorStore's default (long) retries.
    """
    global _installed
    with _lock:
        if _installed:
            return True
        try:
            import orbax.checkpoint as ocp
            from orbax.checkpoint._src.path import gcs_utils
            from orbax.checkpoint._src.serialization import tensorstore_utils
        except ImportError as err:  # pragma: no cover - orbax is a hard dependency
            raise ConfigError(f"orbax-checkpoint is not importable: {err}") from err
        version = getattr(ocp, "__version__", "?")
        hooks = ("_normalize_path", "_use_gcs_driver")
        usable = (
            version in PATCHED_ORBAX_VERSIONS
            and all(callable(getattr(tensorstore_utils, name, None)) for name in hooks)
            and callable(getattr(gcs_utils, "get_kvstore_for_gcs", None))
        )
        if not usable:
            message = (
                f"s3:// checkpoints need orbax-checkpoint {' or '.join(PATCHED_ORBAX_VERSIONS)} "
                f"(installed: {version}); reinstall pdm-jax's pinned dependencies"
            )
            if required:
                raise ConfigError(message)
            log.warning("%s; gs:// saves keep TensorStore's default retries", message)
            return False
        tensorstore_utils._normalize_path = _normalize_path(tensorstore_utils._normalize_path)
        tensorstore_utils._use_gcs_driver = _use_remote_driver(tensorstore_utils._use_gcs_driver)
        gcs_utils.get_kvstore_for_gcs = _kvstore_spec(gcs_utils.get_kvstore_for_gcs)
        _installed = True
        return True


def _normalize_path(original: Callable[[str], str]) -> Callable[[str], str]:
    def normalize(path: str) -> str:
        if path.startswith("s3://"):
            return "s3://" + posixpath.normpath(path[len("s3://") :])
        return original(path)

    return normalize


def _use_remote_driver(original: Callable[[str], bool]) -> Callable[[str], bool]:
    def use_remote(directory: str) -> bool:
        return directory.startswith("s3://") or original(directory)

    return use_remote


def _kvstore_spec(original: Callable[[str], dict[str, Any]]) -> Callable[[str], dict[str, Any]]:
    def spec(path: str) -> dict[str, Any]:
        if path.startswith("s3://"):
            bucket, _, key = path[len("s3://") :].partition("/")
            return {
                "driver": "s3",
                "bucket": bucket,
                "path": key.lstrip("/"),
                "s3_request_retries": dict(RETRIES),
                **_s3_settings,
            }
        out = dict(original(path))
        if out.get("driver") == "gcs":  # gcs_grpc names its retry resource differently
            out.setdefault("gcs_request_retries", dict(RETRIES))
        return out

    return spec


def _map_gcs_emulator_variable() -> None:
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator and not os.environ.get("TENSORSTORE_GCS_HTTP_URL"):
        url = emulator if "://" in emulator else f"http://{emulator}"
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = url
        log.info("STORAGE_EMULATOR_HOST is set: TensorStore talks to %s too", url)


def _resolve_s3_settings() -> None:
    """What TensorStore needs to reach the same S3 as s3fs: endpoint and region, if not AWS's."""
    global _s3_settings_key
    names = (
        "AWS_ENDPOINT_URL_S3",
        "AWS_ENDPOINT_URL",
        "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
        "AWS_PROFILE",
        "AWS_CONFIG_FILE",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
    )
    key = tuple(os.environ.get(name) for name in names)
    with _lock:
        if key == _s3_settings_key:
            return
        settings: dict[str, str] = {}
        endpoint, region = _botocore_view()
        host = (urlsplit(endpoint).hostname or "") if endpoint else ""
        if endpoint and not host.endswith(("amazonaws.com", "amazonaws.com.cn")):
            settings["endpoint"] = endpoint
        # Only a region someone configured: botocore's fallback (us-east-1) would send
        # TensorStore to the wrong regional endpoint for a bucket elsewhere.
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or region
        if region:
            settings["aws_region"] = region
        _s3_settings.clear()
        _s3_settings.update(settings)
        _s3_settings_key = key


def _botocore_view() -> tuple[str | None, str | None]:
    """(endpoint URL botocore would use for S3, region set in the AWS config), no network."""
    try:
        import botocore.session
    except ImportError:  # s3fs brings botocore; fall back to the variables alone
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"), None
    session = botocore.session.get_session()
    region = session.get_config_variable("region")
    client = session.create_client("s3", region_name=region or "us-east-1")
    return client.meta.endpoint_url, region
