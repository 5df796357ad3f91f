"""The Azure Blob client for `az://` checkpoints, from the standard Azure variables.

Why bounded retries: the SDK's own policy backs off for 17 s, 24 s, 42 s, so one upload during an
outage would hang for minutes; here a request gives up after seconds, and the failed save is a
warning while training goes on (see pdm_jax/checkpoint/azure.py).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from pdm_jax.errors import ConfigError

# Seconds to connect, and to wait between bytes, per request.
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60


def container_client(container: str) -> Any:
    """A ContainerClient from the standard Azure variables, with retries bounded to seconds.

    AZURE_STORAGE_CONNECTION_STRING wins; otherwise AZURE_STORAGE_ACCOUNT_NAME (or
    AZURE_STORAGE_ACCOUNT) with AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_SAS_TOKEN, or
    azure-identity's DefaultAzureCredential when that package is installed.
    """
    from azure.storage.blob import BlobServiceClient, LinearRetry

    # The SDK logs every request at INFO; keep that out of training logs unless asked for.
    http_log = logging.getLogger("azure.core.pipeline.policies.http_logging_policy")
    if http_log.level == logging.NOTSET:
        http_log.setLevel(logging.WARNING)
    options: dict[str, Any] = {
        # About 6 s of retrying (3 x 2 s) instead of the SDK's 17 s, 24 s, 42 s.
        "retry_policy": LinearRetry(backoff=2, retry_total=3, random_jitter_range=1),
        "connection_timeout": CONNECT_TIMEOUT_S,
        "read_timeout": READ_TIMEOUT_S,
    }
    connection_string = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
    if connection_string:
        service = BlobServiceClient.from_connection_string(connection_string, **options)
        return service.get_container_client(container)
    account = os.environ.get("AZURE_STORAGE_ACCOUNT_NAME") or os.environ.get(
        "AZURE_STORAGE_ACCOUNT"
    )
    if not account:
        raise ConfigError(
            "az:// checkpoints need AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_NAME "
            "with AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_SAS_TOKEN or azure-identity installed"
        )
    credential: Any
    if os.environ.get("AZURE_STORAGE_ACCOUNT_KEY"):
        credential = {
            "account_name": account,
            "account_key": os.environ["AZURE_STORAGE_ACCOUNT_KEY"],
        }
    elif os.environ.get("AZURE_STORAGE_SAS_TOKEN"):
        credential = os.environ["AZURE_STORAGE_SAS_TOKEN"]
    else:
        try:
            from azure.identity import DefaultAzureCredential
        except ImportError:
            raise ConfigError(
                f"az:// checkpoints for account {account} need a credential: set "
                "AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_TOKEN, or install azure-identity"
            ) from None
        credential = DefaultAzureCredential()
    service = BlobServiceClient(f"https://{account}.blob.core.windows.net", credential, **options)
    return service.get_container_client(container)


def ensure_container(client: Any) -> None:
    """Creates the container for a writer; a credential that may not create containers is fine
    as long as the container exists (the uploads will say so otherwise)."""
    from azure.core.exceptions import HttpResponseError, ResourceExistsError

    try:
        client.create_container()
    except ResourceExistsError:
        pass
    except HttpResponseError as err:
        if err.status_code not in (401, 403):
            raise
