"""Which storage errors are retried, and how often: literal exceptions, no network."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from pipeline.config import RetryConfig
from pipeline.retry import backoff, is_transient, with_retries


def client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")


def wrapped(error: BaseException) -> OSError:
    """How s3fs hands errors up: its own OSError with botocore's error as the cause."""
    try:
        raise error
    except BaseException as cause:
        try:
            raise OSError("s3fs says no") from cause
        except OSError as outer:
            return outer


@pytest.mark.parametrize(
    "error",
    [
        client_error("SlowDown", 503),
        client_error("InternalError", 500),
        client_error("ServiceUnavailable", 503),
        client_error("RequestTimeout", 400),
        ConnectionResetError(104, "Connection reset by peer"),
        ReadTimeoutError(endpoint_url="http://s3"),
        TimeoutError("read timed out"),
        wrapped(client_error("SlowDown", 503)),
        wrapped(ConnectionResetError(104, "reset")),
    ],
    ids=lambda e: type(e).__name__ + ":" + str(e)[:30],
)
def test_transient_errors_are_retried(error: BaseException) -> None:
    assert is_transient(error)


@pytest.mark.parametrize(
    "error",
    [
        client_error("AccessDenied", 403),
        client_error("NoSuchKey", 404),
        client_error("NoSuchBucket", 404),
        client_error("InvalidAccessKeyId", 403),
        client_error("SignatureDoesNotMatch", 403),
        PermissionError("denied"),
        FileNotFoundError("s3://bucket/missing.tar"),
        wrapped(client_error("AccessDenied", 403)),
        ValueError("a bug, not the network"),
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),  # botocore retried it already
    ],
    ids=lambda e: type(e).__name__ + ":" + str(e)[:30],
)
def test_permanent_errors_fail_fast(error: BaseException) -> None:
    assert not is_transient(error)


def test_with_retries_retries_transient_errors_then_succeeds() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise client_error("SlowDown", 503)
        return "done"

    assert with_retries(flaky, RetryConfig(attempts=5, initial_backoff_s=0.001, max_backoff_s=0.002), "op") == "done"
    assert len(calls) == 3


def test_with_retries_gives_up_after_the_last_attempt() -> None:
    calls = []

    def always_503() -> None:
        calls.append(1)
        raise client_error("SlowDown", 503)

    with pytest.raises(ClientError):
        with_retries(always_503, RetryConfig(attempts=4, initial_backoff_s=0.001, max_backoff_s=0.001), "op")
    assert len(calls) == 4


def test_with_retries_raises_permanent_errors_at_once() -> None:
    calls = []

    def denied() -> None:
        calls.append(1)
        raise client_error("AccessDenied", 403)

    with pytest.raises(ClientError):
        with_retries(denied, RetryConfig(attempts=6, initial_backoff_s=0.001), "op")
    assert len(calls) == 1


def test_backoff_is_jittered_below_an_exponential_cap() -> None:
    retries = RetryConfig(initial_backoff_s=0.5, max_backoff_s=4.0)
    for retry, cap in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (8, 4.0)]:
        waits = [backoff(retries, retry) for _ in range(200)]
        assert all(0 <= w <= cap for w in waits)
        assert max(waits) > cap / 2  # spread over the range, not a constant


def test_s3_filesystems_get_botocores_standard_retries_unless_the_environment_says_otherwise(monkeypatch) -> None:
    """One explicit policy per layer: botocore retries single requests in AWS's standard mode (3 attempts), not
    its legacy mode's 5 attempts and 8 s waits, so a dead endpoint reaches the job's own policy in seconds."""
    import s3fs

    from pipeline.config import StorageConfig
    from pipeline.storage import filesystem, fsspec_options

    for name in ("AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)
    storage = StorageConfig(endpoint_url="http://127.0.0.1:9")
    options = fsspec_options(storage, "s3://bucket/out/")
    assert options["config_kwargs"] == {"retries": {"mode": "standard", "max_attempts": 3}}
    fs, _ = filesystem("s3://bucket/out/", storage)
    assert isinstance(fs, s3fs.S3FileSystem) and fs.config_kwargs["retries"]["mode"] == "standard"
    assert "config_kwargs" not in fsspec_options(storage, "/local/out/")

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "7")  # botocore reads it when the config does not say
    assert "config_kwargs" not in fsspec_options(storage, "s3://bucket/out/")
    # The job's setting says first, and reaches every worker with the job (an environment variable may not).
    only_the_jobs_policy = StorageConfig(endpoint_url="http://127.0.0.1:9", request_attempts=1)
    options = fsspec_options(only_the_jobs_policy, "s3://bucket/out/")
    assert options["config_kwargs"] == {"retries": {"mode": "standard", "max_attempts": 1}}
