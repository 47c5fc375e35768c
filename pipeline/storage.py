"""Object storage: fsspec filesystems from a `StorageConfig`, and readable storage errors.

The driver resolves every setting that comes from its own environment (the S3 endpoint) into the
`StorageConfig` it ships to workers, so a worker on another node talks to the same store.
"""

from __future__ import annotations

import errno
import os

import fsspec

from pipeline.config import StorageConfig
from pipeline.urls import protocol_of

# Protocols that name the same store; outputs and shard names use the first spelling.
_S3_PROTOCOLS = ("s3", "s3a")

# botocore's own per-request retries: AWS's "standard" mode at its default of 3 attempts (throttling, 5xx and
# dropped connections, with a retry quota), not botocore's legacy default of 5 attempts with up to 8 s between
# them, under which an unreachable endpoint took ~7 s to report before the job's own policy (`retries`,
# pipeline.retry: whole operations, an allow-list of transient errors) even started. A job's
# `storage.request_attempts` decides first; then AWS_RETRY_MODE or AWS_MAX_ATTEMPTS, as botocore documents.
_BOTOCORE_RETRIES = {"mode": "standard", "max_attempts": 3}
_BOTOCORE_RETRY_VARIABLES = ("AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS")


def resolve_storage(storage: StorageConfig) -> StorageConfig:
    """Pin settings the driver takes from its environment, so remote workers use the same endpoint.

    The endpoint only ever applies to s3:// URLs (see `fsspec_options`), so pinning it is harmless
    for sections whose URLs are local.
    """
    if storage.endpoint_url is None:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            return storage.model_copy(update={"endpoint_url": endpoint})
    return storage


def fsspec_options(storage: StorageConfig, url: str) -> dict[str, object]:
    """Keyword arguments for the URL's fsspec filesystem. Holds secrets: never log the result."""
    options: dict[str, object] = dict(storage.options)
    if protocol_of(url) not in _S3_PROTOCOLS:
        return options
    if storage.endpoint_url:
        options["endpoint_url"] = storage.endpoint_url
    if storage.request_attempts is not None:
        retries = {**_BOTOCORE_RETRIES, "max_attempts": storage.request_attempts}
        options.setdefault("config_kwargs", {})["retries"] = retries  # type: ignore[index]
    elif not any(os.environ.get(name) for name in _BOTOCORE_RETRY_VARIABLES):
        options.setdefault("config_kwargs", {}).setdefault("retries", dict(_BOTOCORE_RETRIES))  # type: ignore[union-attr]
    if storage.region:
        options.setdefault("client_kwargs", {})["region_name"] = storage.region  # type: ignore[index]
    if storage.profile:
        options["profile"] = storage.profile
    if storage.anon:
        options["anon"] = True
    if storage.access_key_id is not None and storage.secret_access_key is not None:
        options["key"] = storage.access_key_id.get_secret_value()
        options["secret"] = storage.secret_access_key.get_secret_value()
    if storage.session_token is not None:
        options["token"] = storage.session_token.get_secret_value()
    return options


def filesystem(url: str, storage: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem serving `url` and the path within it."""
    fs, path = fsspec.core.url_to_fs(url, **fsspec_options(storage, url))
    return fs, path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def describe_storage_error(exc: BaseException, url: str, storage: StorageConfig | None = None) -> str:
    """One line a user can act on, for errors met while listing or opening `url`."""
    endpoint = storage.endpoint_url if storage is not None else None
    where = f"{url}" + (f" (endpoint {endpoint})" if endpoint else "")
    text = str(exc) or type(exc).__name__
    if isinstance(exc, FileNotFoundError):
        return f"{where}: not found"
    if isinstance(exc, PermissionError):
        return f"{where}: access denied ({text})"
    if _is_connection_error(exc):
        return f"{where}: cannot reach the storage endpoint ({text})"
    if isinstance(exc, OSError) and exc.errno == errno.ENOENT:
        return f"{where}: not found"
    return f"{where}: {type(exc).__name__}: {text}"


def _is_connection_error(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        name = type(current).__name__
        if isinstance(current, (ConnectionError, TimeoutError)) or name in {
            "EndpointConnectionError",
            "ConnectTimeoutError",
            "ClientConnectorError",
            "ServerDisconnectedError",
            "ReadTimeoutError",
        }:
            return True
        current = current.__cause__ or current.__context__
    return False
