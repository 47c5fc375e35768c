"""The output prefix: the one place that knows what lives where under `output.url`.

    <name>.parquet                    a shard's committed rows (named after the input shard)
    _staging/<run_id>/<name>.parquet  written first, copied into place, then removed
    _done/<name>.json                 the shard's completion marker, written last; it records the
                                      committed file's rows, size, SHA-256, ETag and key digest
                                      (`pipeline.integrity`)
    _runs/<run_id>.json               a run's summary
    _lease.json                       the lease of the run writing the prefix (`pipeline.lease`)
    _runs/<run_id>.html               a run's report (pipeline.report), for people

Readers skip `_` paths, so only committed files are ever seen as data. Planning, the committer and
the runner ask this object for paths, markers and the filesystem; none of them spells a path.
Every operation is retried on transient storage errors (the job's `retries`).
"""

from __future__ import annotations

import json
import posixpath
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import RetryConfig, StorageConfig
from pipeline.errors import ConfigError
from pipeline.integrity import Fingerprint, listed_etag
from pipeline.retry import with_retries
from pipeline.storage import describe_storage_error, filesystem, join

STAGING_DIR = "_staging"
DONE_DIR = "_done"
RUNS_DIR = "_runs"
DATA_SUFFIX = ".parquet"
MARKER_SUFFIX = ".json"
LEASE_FILE = "_lease.json"

# Markers read at once when a resume or `verify` checks every committed shard: small GETs, mostly waiting.
_PARALLEL_READS = 16
REPORT_SUFFIX = ".html"

T = TypeVar("T")


@dataclass(frozen=True)
class StagedFile:
    path: str
    fingerprint: Fingerprint  # of the bytes written, hashed before they left this process


@dataclass(frozen=True)
class CommittedFile:
    path: str
    fingerprint: Fingerprint
    etag: str | None  # the store's entity tag for the object in place (None where the store has none)


class OutputLayout:
    """An output prefix: its filesystem (built once), its paths, its markers and its run summaries."""

    def __init__(self, url: str, storage: StorageConfig, retries: RetryConfig):
        self.url = url
        self.storage = storage
        self.retries = retries
        self.fs: fsspec.AbstractFileSystem
        self.fs, root = filesystem(url, storage)
        self.root = root.rstrip("/")

    # --- paths -----------------------------------------------------------------------------------------

    def data_path(self, name: str) -> str:
        return join(self.root, f"{name}{DATA_SUFFIX}")

    def staging_dir(self, run_id: str) -> str:
        return join(self.root, STAGING_DIR, run_id)

    def staging_path(self, run_id: str, name: str) -> str:
        return join(self.staging_dir(run_id), f"{name}{DATA_SUFFIX}")

    def marker_path(self, name: str) -> str:
        return join(self.root, DONE_DIR, f"{name}{MARKER_SUFFIX}")

    def staging_root(self) -> str:
        return join(self.root, STAGING_DIR)

    def lease_path(self) -> str:
        return join(self.root, LEASE_FILE)

    def summary_path(self, run_id: str) -> str:
        return join(self.root, RUNS_DIR, f"{run_id}.json")

    def summary_url(self, run_id: str) -> str:
        """The summary's address as the user wrote the prefix (`s3://...`), for messages."""
        return join(self.url, RUNS_DIR, f"{run_id}.json")

    @staticmethod
    def data_name(relative: str) -> str | None:
        """The shard name of a committed data file, from its path relative to the prefix; None for anything
        else (markers, summaries, staged files, the lease: every `_` path, which readers skip too)."""
        if not relative.endswith(DATA_SUFFIX) or any(part.startswith(("_", ".")) for part in relative.split("/")):
            return None
        return relative[: -len(DATA_SUFFIX)]

    @staticmethod
    def marker_name(relative: str) -> str | None:
        """The shard name of a completion marker, from its path relative to the prefix."""
        head = f"{DONE_DIR}/"
        if relative.startswith(head) and relative.endswith(MARKER_SUFFIX):
            return relative[len(head) : -len(MARKER_SUFFIX)]
        return None

    @staticmethod
    def is_staged(relative: str) -> bool:
        return relative.startswith(f"{STAGING_DIR}/")

    def report_path(self, run_id: str) -> str:
        return join(self.root, RUNS_DIR, f"{run_id}{REPORT_SUFFIX}")

    def report_url(self, run_id: str) -> str:
        return join(self.url, RUNS_DIR, f"{run_id}{REPORT_SUFFIX}")

    # --- operations --------------------------------------------------------------------------------------

    def retry(self, operation: Callable[[], T], what: str) -> T:
        return with_retries(operation, self.retries, what)

    def committed(self) -> dict[str, str]:
        """Completion markers under the prefix, by shard output name (one recursive listing)."""
        base = join(self.root, DONE_DIR)

        def listing() -> list[str]:
            try:
                return list(self.fs.find(base))
            except FileNotFoundError:
                return []

        try:
            paths = self.retry(listing, f"listing {join(self.url, DONE_DIR)}/")
        except Exception as exc:
            raise ConfigError(
                f"output.url: cannot list {self.url}: {describe_storage_error(exc, self.url, self.storage)}"
            ) from None
        prefix = self.fs._strip_protocol(base).rstrip("/") + "/"
        found = {}
        for path in paths:
            path = self.fs._strip_protocol(path)
            if path.startswith(prefix) and path.endswith(MARKER_SUFFIX):
                found[path[len(prefix) : -len(MARKER_SUFFIX)]] = path
        return found

    def objects(self) -> dict[str, dict[str, object]]:
        """Every object under the prefix, by its path relative to the prefix, with its listing entry (size,
        ETag where the store has them): one recursive listing, read fresh, whatever an earlier call cached."""

        def listing() -> dict[str, dict[str, object]]:
            self.fs.invalidate_cache(self.root)
            try:
                return self.fs.find(self.root, detail=True)
            except FileNotFoundError:
                return {}

        try:
            found = self.retry(listing, f"listing {self.url}")
        except Exception as exc:
            raise ConfigError(
                f"output.url: cannot list {self.url}: {describe_storage_error(exc, self.url, self.storage)}"
            ) from None
        prefix = self.fs._strip_protocol(self.root).rstrip("/") + "/"
        objects = {}
        for path, info in found.items():
            path = self.fs._strip_protocol(path)
            if path.startswith(prefix) and info.get("type", "file") == "file":
                objects[path[len(prefix) :]] = info
        return objects

    def read_markers(self, names: Iterable[str]) -> dict[str, dict[str, object]]:
        """Several markers, read in parallel (a resume or `verify` reads every one)."""
        names = list(names)
        with ThreadPoolExecutor(max_workers=max(1, min(_PARALLEL_READS, len(names)))) as pool:
            return dict(zip(names, pool.map(self.read_marker, names)))

    def read_marker(self, name: str) -> dict[str, object]:
        def read() -> dict[str, object]:
            with self.fs.open(self.marker_path(name), "rb") as handle:
                return json.loads(handle.read())

        return self.retry(read, f"reading {name}'s marker")

    def write_marker(self, name: str, marker: dict[str, object]) -> None:
        path = self.marker_path(name)

        def write() -> None:
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            with self.fs.open(path, "wb") as handle:
                handle.write(json.dumps(marker, indent=2, sort_keys=True).encode())

        self.retry(write, f"marking {name} done")

    def read_data(self, name: str, columns: list[str] | None = None) -> pa.Table:
        path = self.data_path(name)

        def read() -> pa.Table:
            with self.fs.open(path, "rb") as handle:
                return pq.read_table(handle, columns=columns)

        return self.retry(read, f"reading {path}")

    def data_rows(self, name: str) -> int:
        """The row count in a data file's Parquet footer (a few KB read, not the file)."""
        path = self.data_path(name)

        def read() -> int:
            with self.fs.open(path, "rb") as handle:
                return pq.ParquetFile(handle).metadata.num_rows

        return self.retry(read, f"reading {path}'s footer")

    def read_bytes(self, path: str) -> bytes:
        return self.retry(lambda: self.fs.cat_file(path), f"reading {path}")

    def stage(self, run_id: str, name: str, table: pa.Table, compression: str | None) -> StagedFile:
        """Write the shard's file under `_staging/`, fingerprinted from the very bytes written."""
        path = self.staging_path(run_id, name)
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer, compression=compression)
        data = buffer.getvalue().to_pybytes()

        def write() -> None:
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            with self.fs.open(path, "wb") as sink:
                sink.write(data)

        self.retry(write, f"staging {path}")
        return StagedFile(path=path, fingerprint=Fingerprint.of(data))

    def publish(self, staged: StagedFile, name: str) -> CommittedFile:
        """Copy a staged file over the shard's data file: readers see the old file or the new one. The copy's
        entity tag is read back, so a later listing can tell whether the object was replaced since."""
        final = self.data_path(name)

        def copy() -> str | None:
            self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
            self.fs.copy(staged.path, final)
            self.fs.invalidate_cache(final)
            return listed_etag(self.fs.info(final))

        etag = self.retry(copy, f"committing {final}")
        return CommittedFile(path=final, fingerprint=staged.fingerprint, etag=etag)

    def discard(self, path: str, *, recursive: bool = False) -> None:
        """Remove a staged file or prefix; a failure only leaves a hidden `_staging` entry behind."""
        try:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass

    def write_summary(self, run_id: str, text: str) -> str:
        self._write_text(self.summary_path(run_id), text)
        return self.summary_url(run_id)

    def write_report(self, run_id: str, html: str) -> str:
        self._write_text(self.report_path(run_id), html)
        return self.report_url(run_id)

    def _write_text(self, path: str, text: str) -> None:
        def write() -> None:
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            with self.fs.open(path, "wb") as handle:
                handle.write(text.encode())

        self.retry(write, f"writing {path}")

    def check_writable(self, *, write_probe: bool) -> None:
        """Check the prefix's bucket exists, then (unless read-only) write and delete a probe, so a missing
        bucket or a denied write stops a run before any work. Never creates a bucket (s3fs's makedirs would)."""
        try:
            if self._nearest_existing(self.root) is None:
                raise ConfigError(
                    f"output.url: cannot write under {self.url}: its bucket does not exist (runs never create buckets)"
                )
            if not write_probe:
                return
            probe = join(self.root, RUNS_DIR, f".write-check-{secrets.token_hex(4)}")
            self.fs.makedirs(posixpath.dirname(probe), exist_ok=True)
            with self.fs.open(probe, "wb") as handle:
                handle.write(b"ok")
            self.fs.rm(probe)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(
                f"output.url: cannot write under {self.url}: {describe_storage_error(exc, self.url, self.storage)}"
            ) from None

    def _nearest_existing(self, path: str) -> str | None:
        """The path or its closest existing ancestor: a run creates the rest, but not a bucket."""
        while not self.fs.exists(path):
            parent = posixpath.dirname(path.rstrip("/"))
            if not parent or parent == path:
                return None
            path = parent
        return path
