"""Driver-side output: one Parquet file per input shard, committed once, exactly once.

Rows reach the driver in whatever order Ray Data finishes them, and a retried task or a restarted
actor may deliver some twice. The committer keeps the first copy of each sample (by its position
in the shard), buffers a shard's rows until its `shard_end` row has said how many samples it holds
and that many have arrived, then commits it in three steps through the output layout
(`pipeline.layout`), each retried on transient errors:

1. stage it (`_staging/<run_id>/<name>.parquet`);
2. copy it over `<name>.parquet` (one PUT/copy: readers see the old file or the new one, never half);
3. write its completion marker (`_done/<name>.json`) last. The marker vouches for the file: its rows,
   size, SHA-256 and key digest, and the store's ETag for it (`pipeline.integrity`), so a resume
   notices a file lost or replaced since, and `llava-pipeline verify` can audit the prefix.

Commits run on a few threads (`output.commit_threads`) while the driver goes on admitting rows: a
commit is mostly waiting on the object store (each step is a request), and one shard's three steps
stay in order on one thread. A failed commit fails the run when the driver next collects commits.

A shard with a marker is finished: a rerun, a resumed run or tomorrow's incremental run skips it.
A run killed between steps leaves at most a staged file (hidden: readers skip `_` paths) or a final
file without its marker, which the next run rewrites under the same name: nothing is duplicated.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Mapping

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import faults, integrity, rows
from pipeline.layout import CommittedFile, OutputLayout
from pipeline.schema import EMBEDDINGS_KEY, OutputSchema, embeddings_metadata
from pipeline.shards import Shard

log = logging.getLogger(__name__)


@dataclass
class ShardResult:
    """What the driver learned about one shard: its status from the read stage, its rows from all."""

    shard: Shard
    expected: int | None = None
    status: str | None = None
    error: str | None = None
    parts: list[pa.Table] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    duplicates: int = 0
    output_path: str | None = None
    finished: bool = False
    committed_at: float | None = None  # time.monotonic() when its marker was in place, on the commit's thread
    rows_written: int = 0
    rows_replaced: int = 0
    # What the committed file's `llava_pipeline.embeddings` says: column -> {model, dimension}
    embeddings: dict[str, dict[str, object]] = field(default_factory=dict)

    @property
    def received(self) -> int:
        return len(self.seen)

    @property
    def complete(self) -> bool:
        return self.expected is not None and self.received >= self.expected


class ShardCommitter:
    """Commits each shard once all its rows arrived. With `patch`, a shard's arriving rows (retry-failed)
    replace, by key, the rows of its committed file instead of making a new one. `guard`, when given, is
    called before each commit and raises when this run may no longer write (its lease on the prefix was lost).
    `embedding_models` (embedding column -> the model that makes it, as the job names it) goes into each
    file's metadata with the dimension of the vectors committed (`llava_pipeline.embeddings`).
    """

    def __init__(
        self,
        *,
        layout: OutputLayout,
        shards: list[Shard],
        schema: OutputSchema,
        constants: dict[str, object],
        run_id: str,
        compression: str,
        settings_digest: str = "",
        patch: bool = False,
        commit_threads: int = 1,
        guard: Callable[[], None] | None = None,
        embedding_models: Mapping[str, str] | None = None,
    ):
        self.layout = layout
        self.schema = schema
        self.constants = constants
        self.run_id = run_id
        self.compression = None if compression == "none" else compression
        self.settings_digest = settings_digest
        self.patch = patch
        self.guard = guard
        self.embedding_models = dict(embedding_models or {})
        self.results = {s.url: ShardResult(s) for s in shards}
        self.committed: list[ShardResult] = []
        self._ready: set[str] = set()
        self._commit_threads = commit_threads
        self._pool: ThreadPoolExecutor | None = None
        self._in_flight: dict[str, Future] = {}

    @property
    def duplicates(self) -> int:
        """Rows delivered more than once (retried tasks, restarted actors) and dropped."""
        return sum(r.duplicates for r in self.results.values())

    def add(self, table: pa.Table) -> list[ShardResult]:
        """Take a batch of finished rows; returns the shards this batch completed and committed."""
        self.admit(table)
        return self.commit_ready() + self.drain()

    def admit(self, table: pa.Table) -> pa.Table:
        """Record a batch; returns its rows minus samples already received (what the run's counters count)."""
        ends = table.filter(pc.equal(table.column(rows.RECORD), rows.SHARD_END))
        fresh_parts = []
        for end in ends.to_pylist():
            result = self.results[end["shard"]]
            if result.expected is None:
                fresh_parts.append(ends.filter(pc.equal(ends.column("shard"), end["shard"])).slice(0, 1))
            result.expected = end[rows.SHARD_SAMPLES]
            result.status = end[rows.SHARD_STATUS]
            result.error = end[rows.SHARD_ERROR]
            self._ready.add(end["shard"])

        samples = table.filter(pc.equal(table.column(rows.RECORD), rows.SAMPLE))
        if samples.num_rows:
            shard_column = samples.column("shard")
            for url in pc.unique(shard_column).to_pylist():
                part = samples.filter(pc.equal(shard_column, url))
                result = self.results[url]
                fresh = self._first_copies(result, part)
                if fresh is not None:
                    result.parts.append(fresh)
                    fresh_parts.append(fresh)
                self._ready.add(url)
        if not fresh_parts:
            return table.slice(0, 0)
        return pa.concat_tables(fresh_parts, promote_options="permissive")

    def commit_ready(self) -> list[ShardResult]:
        """Start committing every shard whose rows have all arrived; returns the shards whose commits
        finished since the last call. A commit that failed raises here."""
        for url in sorted(self._ready):
            result = self.results[url]
            if result.complete and not result.finished and url not in self._in_flight:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self._commit_threads, thread_name_prefix="commit")
                self._in_flight[url] = self._pool.submit(self._commit, result)
        self._ready.clear()
        return self._collect(wait=False)

    def drain(self) -> list[ShardResult]:
        """Wait for every commit in flight; returns the shards they committed. A commit that failed raises here."""
        return self._collect(wait=True)

    def close(self) -> None:
        """Let commits in flight finish (a run that is failing anyway only logs theirs), then stop the threads."""
        for url, future in self._in_flight.items():
            try:
                future.result()
            except Exception as exc:
                log.warning("committing %s failed: %s", url, exc)
        self._in_flight.clear()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _collect(self, *, wait: bool) -> list[ShardResult]:
        done = []
        for url, future in list(self._in_flight.items()):
            if wait or future.done():
                del self._in_flight[url]
                future.result()
                done.append(self.results[url])
        return done

    def _first_copies(self, result: ShardResult, part: pa.Table) -> pa.Table | None:
        """The rows of `part` this shard has not received yet; repeats are counted and dropped."""
        keep = []
        for position, index in enumerate(part.column(rows.INDEX).to_pylist()):
            if result.finished or index in result.seen:
                result.duplicates += 1
                continue
            result.seen.add(index)
            keep.append(position)
        if result.duplicates:
            log.debug("%s: %d repeated row(s) dropped so far", result.shard.url, result.duplicates)
        if not keep:
            return None
        return part if len(keep) == part.num_rows else part.take(pa.array(keep, pa.int64()))

    def unfinished(self) -> list[ShardResult]:
        """Shards not committed (or known failed) yet; a commit in flight counts as unfinished."""
        return [r for r in self.results.values() if not r.finished]

    def _commit(self, result: ShardResult) -> None:
        if result.received != result.expected:
            raise RuntimeError(
                f"{result.shard.url}: {result.received} rows arrived for {result.expected} samples; refusing to write"
            )
        if result.status == rows.SHARD_FAILED:
            # No file and no marker: the next run tries the shard again.
            result.finished = True
            return
        if self.guard is not None:
            self.guard()
        name = result.shard.name
        table = self._conform(result)
        if self.patch:
            table, result.rows_replaced = self._patched(name, table, result.shard.url)
        staged = self.layout.stage(self.run_id, name, table, self.compression)
        faults.inject("driver.commit")
        committed = self.layout.publish(staged, name)
        self.layout.write_marker(name, self._marker(result, committed, table))
        result.committed_at = time.monotonic()
        faults.inject("driver.committed")
        try:
            self.layout.discard(staged.path)
        except Exception as exc:  # the staging prefix is removed at the end of the run anyway
            log.debug("could not remove %s: %s", staged.path, exc)
        final = committed.path
        result.output_path = final
        result.embeddings = embeddings_metadata(table, self.embedding_models)
        result.rows_written = table.num_rows
        result.finished = True
        result.parts.clear()
        self.committed.append(result)
        log.debug("committed %s (%d rows)", final, table.num_rows)

    def _marker(self, result: ShardResult, committed: CommittedFile, table: pa.Table) -> dict[str, object]:
        failed = table.num_rows - (pc.sum(pc.is_null(table.column("error"))).as_py() or 0)
        marker: dict[str, object] = {
            "shard": result.shard.url,
            "output": committed.path,
            "status": result.status,
            "error": result.error,
            "rows": table.num_rows,
            "failed_rows": failed,
            "run_id": self.run_id,
            "settings_sha256": self.settings_digest,
            "committed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **integrity.marker_fields(committed.fingerprint, committed.etag, table.column("key").to_pylist()),
        }
        if self.patch:
            marker["rows_replaced"] = result.rows_replaced
        return marker

    def _patched(self, name: str, retried: pa.Table, url: str) -> tuple[pa.Table, int]:
        """The committed rows with each retried sample's row put in its place, by key."""
        # a file an earlier schema version wrote gets the columns added since, null
        existing = self.schema.upgrade(self.layout.read_data(name)).select(retried.column_names).cast(retried.schema)
        position = {key: i for i, key in enumerate(existing.column("key").to_pylist())}
        missing = [key for key in retried.column("key").to_pylist() if key not in position]
        if missing:
            raise RuntimeError(
                f"{self.layout.data_path(name)}: retried samples {missing[:3]} are not in the committed file"
            )
        replaced = pc.is_in(existing.column("key"), value_set=retried.column("key"))
        kept = existing.filter(pc.invert(replaced))
        order = [position[k] for k in kept.column("key").to_pylist()] + [
            position[k] for k in retried.column("key").to_pylist()
        ]
        merged = pa.concat_tables([kept, retried])
        merged = merged.take(pc.sort_indices(pa.array(order, pa.int64())))
        return self.schema.conform(merged, extra_metadata=self._file_metadata(merged, url)), retried.num_rows

    def _conform(self, result: ShardResult) -> pa.Table:
        if result.parts:
            table = pa.concat_tables(result.parts, promote_options="permissive")
            table = table.take(pc.sort_indices(table.column(rows.INDEX)))
        else:
            table = self.schema.arrow.empty_table()
        for name, value in self.constants.items():
            table = rows.set_column(table, name, pa.array([value] * table.num_rows, self.schema.arrow.field(name).type))
        return self.schema.conform(table, extra_metadata=self._file_metadata(table, result.shard.url))

    def _file_metadata(self, table: pa.Table, url: str) -> dict[str, str]:
        metadata = {"run_id": self.run_id, "shard": url}
        if self.embedding_models:
            metadata[EMBEDDINGS_KEY] = json.dumps(embeddings_metadata(table, self.embedding_models), sort_keys=True)
        return metadata

    def cleanup_staging(self) -> None:
        staging = self.layout.staging_dir(self.run_id)
        try:
            self.layout.discard(staging, recursive=True)
        except Exception as exc:
            log.warning("could not remove the staging prefix %s: %s", staging, exc)
