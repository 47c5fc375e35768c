"""Retries at the object-store boundary: transient errors only, exponential backoff with full jitter.

s3fs and botocore already retry single requests (botocore in its standard mode, 3 attempts: see
`pipeline.storage`); this wraps whole operations (open a shard and
stream it, write a staged file, copy it into place, write a marker) so a connection dropped
mid-body or a burst of 503s costs a retry of that operation instead of a shard or a run.
Errors that another try cannot fix (denied, missing, bad credentials, a bad request) are raised
at once.
"""

from __future__ import annotations

import errno
import logging
import random
import re
import time
from typing import Callable, TypeVar

from pipeline.config import RetryConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

# HTTP statuses and S3 error codes that mean "try again": throttling and server-side trouble.
_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "InternalError",
        "ServiceUnavailable",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "OperationAborted",
    }
)
_PERMANENT_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "NoSuchBucket",
        "NoSuchKey",
        "ExpiredToken",
        "InvalidToken",
        "AllAccessDisabled",
    }
)
# Exception class names from the layers under s3fs (aiohttp, botocore, urllib3, http.client) that
# mean the connection broke or timed out; matched by name so no optional import is needed. A refused
# connection is left out: botocore already retried it, and a wrong endpoint should fail fast.
_TRANSIENT_NAMES = frozenset(
    {
        "ConnectionResetError",
        "ConnectionAbortedError",
        "BrokenPipeError",
        "TimeoutError",
        "IncompleteRead",
        "IncompleteReadError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "ConnectionClosedError",
        "ResponseStreamingError",
        "ClientPayloadError",
        "ServerDisconnectedError",
        "ClientOSError",
        "ServerTimeoutError",
        "FSTimeoutError",
        "ProtocolError",
        "RemoteDisconnected",
        "ContentLengthError",
    }
)
_STATUS_IN_TEXT = re.compile(r"\b(?:status(?: code)?|HTTP)[ :=]*(\d{3})\b", re.IGNORECASE)


def backoff(retries: RetryConfig, retry: int) -> float:
    """Full jitter (AWS's recommendation): uniform in [0, min(max, initial * 2**retry)]."""
    return random.uniform(0, min(retries.max_backoff_s, retries.initial_backoff_s * (2**retry)))


def error_chain(error: BaseException) -> list[BaseException]:
    """The error and every cause or context behind it, outermost first (each once)."""
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _code_and_status(error: BaseException) -> tuple[str | None, int | None]:
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code, status
    status = getattr(error, "status", None) or getattr(error, "status_code", None)
    return None, status if isinstance(status, int) else None


def is_transient(error: BaseException) -> bool:
    """True for errors another try may fix; False for everything else, permanent errors first."""
    chain = error_chain(error)
    for link in chain:
        if isinstance(link, (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError)):
            return False
        code, status = _code_and_status(link)
        if code in _PERMANENT_CODES or (code not in _TRANSIENT_CODES and status in (400, 401, 403, 404)):
            return False
    for link in chain:
        code, status = _code_and_status(link)
        if code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS:
            return True
        if type(link).__name__ in _TRANSIENT_NAMES:
            return True
        if isinstance(link, OSError) and link.errno in (errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT):
            return True
        text = str(link)
        match = _STATUS_IN_TEXT.search(text)
        if match and int(match.group(1)) in _TRANSIENT_STATUS:
            return True
        if any(code in text for code in ("SlowDown", "ServiceUnavailable", "InternalError")):
            return True
    return False


def with_retries(operation: Callable[[], T], retries: RetryConfig, what: str, *, on_retry=None) -> T:
    """Run `operation`, retrying transient errors up to `retries.attempts` tries in all (the job's `retries`)."""
    for attempt in range(1, retries.attempts + 1):
        try:
            return operation()
        except Exception as exc:
            if attempt == retries.attempts or not is_transient(exc):
                raise
            wait = backoff(retries, attempt - 1)
            log.warning(
                "%s: transient %s (%s); try %d of %d in %.1f s",
                what,
                type(exc).__name__,
                str(exc).splitlines()[0][:200] if str(exc) else "",
                attempt + 1,
                retries.attempts,
                wait,
            )
            if on_retry is not None:
                on_retry(exc)
            time.sleep(wait)
    raise AssertionError("unreachable")
