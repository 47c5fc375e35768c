"""One writer per output prefix: the lease a run holds on `<output>/_lease.json` while it may write there.

A run (and `retry-failed`) takes the lease before it plans or writes anything and gives it back at the
end. The lease names its holder (run id, command, job, host and process) and when it expires; a
heartbeat thread renews it every `output.lease.heartbeat_s`, pushing the expiry `output.lease.expiry_s`
ahead. A run killed outright stops renewing, so its lease lapses at most `expiry_s` later and the next
run takes it over. A second run meeting a live lease stops with exit code 2, naming the holder.

How "only one wins" is enforced depends on the store:

- S3 (and S3-compatible stores that implement conditional writes, as AWS S3 and MinIO do): the lease is
  created with `PutObject If-None-Match: *`, renewed and taken over with `If-Match: <ETag>` and deleted
  with `If-Match` (a store that ignores a delete's condition deletes anyway, after this run has just
  renewed the lease as its own), so two runs racing for it cannot both get it, and a holder whose lease
  was broken learns so at its next heartbeat instead of overwriting the new holder's lease.
- Local paths: created with `O_CREAT | O_EXCL` (atomic); renewals and takeovers compare the lease's
  content before replacing it, which is best-effort (a race in the instant between the two can be lost).
- Other fsspec stores: best-effort throughout: look, write, read back and compare.

Every acquisition first reads the lease, so even a store that ignored the conditions would only lose
a race in the moment between that read and the write.

A holder that learns at a heartbeat that its lease was taken (an operator's `--force-unlock`), or that
could not renew it before it expired, stops: the committer asks `assert_held()` before every commit.
Expiry is judged on the clock of the run that reads the lease: hosts' clocks must agree (NTP) to well
within `expiry_s`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Iterator, Protocol

from fsspec.asyn import sync

from pipeline.config import JobConfig, LeaseConfig
from pipeline.errors import ConfigError, PipelineError
from pipeline.layout import OutputLayout
from pipeline.retry import error_chain
from pipeline.storage import describe_storage_error, resolve_storage

log = logging.getLogger(__name__)

# Tries at taking the lease when others keep changing it between our look and our write.
_ACQUIRE_ROUNDS = 5


class LeaseHeld(PipelineError):
    """Another run holds the output prefix's lease: nothing was started."""

    exit_code = 2


class LeaseLost(PipelineError):
    """This run's lease was taken over or ran out: it must stop writing."""


@dataclass(frozen=True)
class LeaseRecord:
    """The lease file's content."""

    run_id: str
    command: str
    job: str
    holder: str  # host and process id
    token: str  # unique to this acquisition: tells our lease from another run's
    acquired_at: str
    renewed_at: str
    expires_at: str

    @property
    def expires(self) -> datetime:
        return datetime.fromisoformat(self.expires_at)

    def expired(self, now: datetime) -> bool:
        return now >= self.expires

    def describe(self) -> str:
        return f"run {self.run_id} ({self.command} of job {self.job} on {self.holder})"

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), indent=2) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "LeaseRecord | None":
        """The record, or None when the file is not a lease this code wrote (unreadable, fields missing)."""
        try:
            fields = json.loads(data)
            record = cls(**{name: str(fields[name]) for name in cls.__dataclass_fields__})
            record.expires  # noqa: B018 - a timestamp that does not parse makes the record unreadable
            return record
        except (ValueError, KeyError, TypeError):
            return None


class _Store(Protocol):
    """The lease object with compare-and-swap operations; a version is whatever identifies one write."""

    def read(self) -> tuple[bytes, str] | None: ...

    def create(self, body: bytes) -> str | None:
        """Write the lease if there is none; its version, or None when one exists."""

    def replace(self, body: bytes, version: str) -> str | None:
        """Overwrite the lease if it is still at `version`; the new version, or None when it is not."""

    def delete(self, version: str) -> bool: ...


def _precondition_failed(exc: BaseException) -> bool:
    for link in error_chain(exc):
        response = getattr(link, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
            return True
    return False


class _S3Store:
    """Conditional writes: If-None-Match to create, If-Match to replace and delete."""

    def __init__(self, fs, path: str):
        self.fs = fs
        self.bucket, self.key, _ = fs.split_path(path)

    def read(self) -> tuple[bytes, str] | None:
        async def get() -> tuple[bytes, str]:
            # Body and ETag from one GET: a HEAD then a GET could pair one write's ETag with another's body.
            response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            async with response["Body"] as body:
                return await body.read(), response["ETag"]

        try:
            return sync(self.fs.loop, get)
        except FileNotFoundError:
            return None

    def create(self, body: bytes) -> str | None:
        try:
            return self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=body, IfNoneMatch="*")["ETag"]
        except FileExistsError:
            return None

    def replace(self, body: bytes, version: str) -> str | None:
        try:
            return self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=body, IfMatch=version)["ETag"]
        except FileNotFoundError:
            return None
        except OSError as exc:
            if _precondition_failed(exc):
                return None
            raise

    def delete(self, version: str) -> bool:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=version)
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            if _precondition_failed(exc):
                return False
            raise


class _FileStore:
    """Any other fsspec filesystem; the version is the content's digest. Creation is atomic on local disks
    (O_EXCL); elsewhere, and for replacing, it is look-then-write (see the module's docstring)."""

    def __init__(self, fs, path: str):
        self.fs = fs
        self.path = path
        self.local = "file" in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol)

    @staticmethod
    def _version(body: bytes) -> str:
        return hashlib.sha256(body).hexdigest()

    def read(self) -> tuple[bytes, str] | None:
        self.fs.invalidate_cache(self.path)
        try:
            body = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return body, self._version(body)

    def create(self, body: bytes) -> str | None:
        if self.local:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return None
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(body)
            return self._version(body)
        if self.read() is not None:
            return None
        self._write(body)
        current = self.read()  # read back: if another run wrote in between, the last writer holds it
        return current[1] if current is not None and current[0] == body else None

    def replace(self, body: bytes, version: str) -> str | None:
        current = self.read()
        if current is None or current[1] != version:
            return None
        self._write(body)
        return self._version(body)

    def delete(self, version: str) -> bool:
        current = self.read()
        if current is None or current[1] != version:
            return False
        self.fs.rm(self.path)
        return True

    def _write(self, body: bytes) -> None:
        if self.local:
            temporary = f"{self.path}.{os.getpid()}.tmp"
            with open(temporary, "wb") as handle:
                handle.write(body)
            os.replace(temporary, self.path)  # readers see the old lease or the new one, never half
        else:
            self.fs.pipe_file(self.path, body)


def _store_for(layout: OutputLayout) -> _Store:
    protocols = (layout.fs.protocol,) if isinstance(layout.fs.protocol, str) else tuple(layout.fs.protocol)
    if "s3" in protocols:
        return _S3Store(layout.fs, layout.lease_path())
    return _FileStore(layout.fs, layout.lease_path())


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _stamp(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


class OutputLease:
    """A run's lease on an output prefix: `acquire`, then `assert_held` before each write, then `release`."""

    def __init__(self, layout: OutputLayout, *, run_id: str, command: str, job_name: str, config: LeaseConfig):
        self.layout = layout
        self.run_id = run_id
        self.command = command
        self.job_name = job_name
        self.config = config
        self.token = os.urandom(12).hex()
        self._store = _store_for(layout)
        self._acquired_at = _now()
        self._version: str | None = None
        self._expires: datetime | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    # --- the lease's life ----------------------------------------------------------------------------------

    def acquire(self, *, force_unlock: bool = False) -> "OutputLease":
        """Take the lease, or raise LeaseHeld naming the live holder. `force_unlock` takes it from any holder."""
        try:
            self._take(force_unlock)
        except PipelineError:
            raise
        except Exception as exc:
            if isinstance(exc, FileNotFoundError):
                self.layout.check_writable(write_probe=False)  # a missing bucket says so in its own words
            raise ConfigError(
                f"output.url: cannot take the lease {self.layout.url.rstrip('/')}/{self._lease_name}: "
                f"{describe_storage_error(exc, self.layout.url, self.layout.storage)}"
            ) from None
        self._heartbeat = threading.Thread(target=self._beat, name="output-lease-heartbeat", daemon=True)
        self._heartbeat.start()
        log.debug("run %s holds the lease on %s until %s", self.run_id, self.layout.url, _stamp(self._expires))
        return self

    def assert_held(self) -> None:
        """Raise LeaseLost when this run may no longer write under the prefix."""
        if self._lost is not None:
            raise LeaseLost(self._lost)
        if self._expires is not None and _now() >= self._expires:
            raise LeaseLost(
                f"run {self.run_id}'s lease on {self.layout.url} expired at {_stamp(self._expires)} without being "
                "renewed (storage unreachable?); stopping so that another run can take the prefix"
            )

    def release(self) -> None:
        """Stop renewing and delete the lease, if it is still ours."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        if self._version is None or self._lost is not None:
            return
        try:
            self.layout.retry(lambda: self._store.delete(self._version), f"releasing {self._lease_name}")
        except Exception as exc:  # it lapses by itself at its expiry
            log.warning("could not release the lease on %s (it lapses at %s): %s", self.layout.url, self._expires, exc)
        self._version = None

    def __enter__(self) -> "OutputLease":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    # --- inside ----------------------------------------------------------------------------------------------

    @property
    def _lease_name(self) -> str:
        return self.layout.lease_path().rsplit("/", 1)[-1]

    def _record(self, now: datetime) -> LeaseRecord:
        return LeaseRecord(
            run_id=self.run_id,
            command=self.command,
            job=self.job_name,
            holder=f"{socket.gethostname()} pid {os.getpid()}",
            token=self.token,
            acquired_at=_stamp(self._acquired_at),
            renewed_at=_stamp(now),
            expires_at=_stamp(now + timedelta(seconds=self.config.expiry_s)),
        )

    def _take(self, force_unlock: bool) -> None:
        retry = self.layout.retry
        holder: LeaseRecord | None = None
        for _ in range(_ACQUIRE_ROUNDS):
            current = retry(self._store.read, f"reading {self._lease_name}")
            now = _now()
            record = self._record(now)
            if current is None:
                version = retry(partial(self._store.create, record.to_bytes()), f"creating {self._lease_name}")
                if version is not None:
                    self._held(version, record)
                    return
                continue  # another run created it between our look and our write: look again
            body, version = current
            holder = LeaseRecord.from_bytes(body)
            if holder is not None and holder.token == self.token:
                # Our own write, whose answer was lost to a transient error before a retry found it in place.
                self._held(version, holder)
                return
            if holder is None and not force_unlock:
                raise LeaseHeld(
                    f"{self.layout.url} has a lease file ({self._lease_name}) this version cannot read; if no run "
                    "is writing there, rerun with --force-unlock to replace it"
                )
            if holder is not None and not holder.expired(now) and not force_unlock:
                raise LeaseHeld(_held_message(self.layout.url, holder))
            if holder is None or not holder.expired(now):
                log.warning(
                    "--force-unlock: taking the lease on %s from %s; that run stops at its next heartbeat",
                    self.layout.url,
                    holder.describe() if holder else "an unreadable lease",
                )
            else:
                log.info(
                    "the lease of %s on %s expired at %s: taking it over",
                    holder.describe(),
                    self.layout.url,
                    holder.expires_at,
                )
            replaced = retry(partial(self._store.replace, record.to_bytes(), version), f"taking {self._lease_name}")
            if replaced is not None:
                self._held(replaced, record)
                return
        if holder is not None:
            raise LeaseHeld(_held_message(self.layout.url, holder))
        raise LeaseHeld(f"{self.layout.url}: other runs kept taking the lease; try again")

    def _held(self, version: str, record: LeaseRecord) -> None:
        self._version = version
        self._expires = record.expires

    def _beat(self) -> None:
        while not self._stop.wait(self.config.heartbeat_s):
            if self._lost is not None:
                return
            self._renew()

    def _renew(self) -> None:
        now = _now()
        record = self._record(now)
        try:
            version = self.layout.retry(
                lambda: self._store.replace(record.to_bytes(), self._version), f"renewing {self._lease_name}"
            )
        except Exception as exc:
            if now >= self._expires:
                self._lose(f"could not renew its lease on {self.layout.url} before it expired ({exc})")
            else:
                log.warning(
                    "could not renew the lease on %s (expires at %s); trying again: %s",
                    self.layout.url,
                    _stamp(self._expires),
                    exc,
                )
            return
        if version is None:
            current = self._store.read()
            taker = LeaseRecord.from_bytes(current[0]) if current else None
            if taker is not None and taker.token == self.token:
                # Our renewal went through but its answer was lost; a retry then failed against it.
                self._held(current[1], taker)
                return
            self._lose(
                f"its lease on {self.layout.url} was taken by {taker.describe()} (--force-unlock?)"
                if taker is not None
                else f"its lease on {self.layout.url} was removed"
            )
            return
        self._held(version, record)

    def _lose(self, why: str) -> None:
        self._lost = f"run {self.run_id} stopped writing: {why}"
        log.error("%s", self._lost)


def _held_message(url: str, holder: LeaseRecord) -> str:
    return (
        f"{url} is being written by {holder.describe()}: its lease expires at {holder.expires_at} unless renewed "
        f"(last renewed {holder.renewed_at}). Only one run may write an output prefix at a time. Wait for it to "
        "finish; if that run is dead, its lease lapses by itself, or an operator can take it now with "
        "--force-unlock."
    )


def read_lease(layout: OutputLayout) -> LeaseRecord | None:
    """The lease on the prefix as it stands (None: no lease, or one this version cannot read)."""
    current = layout.retry(_store_for(layout).read, f"reading {layout.lease_path()}")
    return LeaseRecord.from_bytes(current[0]) if current is not None else None


@contextmanager
def output_lease(job: JobConfig, *, run_id: str, command: str, force_unlock: bool = False) -> Iterator[OutputLease]:
    """Hold the lease on the job's output prefix for the duration of the block."""
    layout = OutputLayout(job.output.url, resolve_storage(job.storage_for("output")), job.retries)
    lease = OutputLease(layout, run_id=run_id, command=command, job_name=job.name, config=job.output.lease)
    lease.acquire(force_unlock=force_unlock)
    try:
        yield lease
    finally:
        lease.release()
