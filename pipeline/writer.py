"""Driver-side output: one Parquet file per input shard, committed once, exactly once.

Rows reach the driver in whatever order Ray Data finishes them, and a retried task or a restarted
actor may deliver some twice. The committer keeps the first copy of each sample (by its position
in the shard), buffers a shard's rows until its `shard_end` row has said how many samples it holds
and that many have arrived, then commits it in three steps, each retried on transient errors:

1. write `_staging/<run_id>/<name>.parquet`;
2. copy it to `<name>.parquet` (one PUT/copy: readers see the old file or the new one, never half);
3. write `_done/<name>.json`, the shard's completion marker, last.

A shard with a marker is finished: a rerun, a resumed run or tomorrow's incremental run skips it.
A run killed between steps leaves at most a staged file (hidden: readers skip `_` paths) or a final
file without its marker, which the next run rewrites under the same name: nothing is duplicated.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import faults, rows
from pipeline.retry import RetryPolicy, with_retries
from pipeline.schema import OutputSchema
from pipeline.shards import Shard
from pipeline.storage import join

log = logging.getLogger(__name__)

STAGING_DIR = "_staging"
RUNS_DIR = "_runs"
DONE_DIR = "_done"


def marker_path(root: str, shard: Shard) -> str:
    return join(root, DONE_DIR, f"{shard.name}.json")


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
    rows_written: int = 0
    rows_replaced: int = 0

    @property
    def received(self) -> int:
        return len(self.seen)

    @property
    def complete(self) -> bool:
        return self.expected is not None and self.received >= self.expected


@dataclass(frozen=True)
class Patch:
    """Retry-failed mode: the shard's committed rows, of which the arriving rows replace some."""

    existing_path: str


class ShardCommitter:
    def __init__(
        self,
        *,
        fs,
        root: str,
        shards: list[Shard],
        schema: OutputSchema,
        constants: dict[str, object],
        run_id: str,
        compression: str,
        settings_digest: str = "",
        retry_policy: RetryPolicy | None = None,
        patches: dict[str, Patch] | None = None,
    ):
        self.fs = fs
        self.root = root.rstrip("/")
        self.schema = schema
        self.constants = constants
        self.run_id = run_id
        self.compression = None if compression == "none" else compression
        self.settings_digest = settings_digest
        self.retry_policy = retry_policy or RetryPolicy()
        self.patches = patches or {}
        self.results = {s.url: ShardResult(s) for s in shards}
        self.committed: list[ShardResult] = []
        self._ready: set[str] = set()

    @property
    def duplicates(self) -> int:
        """Rows delivered more than once (retried tasks, restarted actors) and dropped."""
        return sum(r.duplicates for r in self.results.values())

    def add(self, table: pa.Table) -> list[ShardResult]:
        """Take a batch of finished rows; returns the shards this batch completed and committed."""
        self.admit(table)
        return self.commit_ready()

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
        """Commit every shard whose rows have all arrived."""
        done = []
        for url in sorted(self._ready):
            result = self.results[url]
            if result.complete and not result.finished:
                self._commit(result)
                done.append(result)
        self._ready.clear()
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
        return [r for r in self.results.values() if not r.finished]

    def _retry(self, operation, what: str):
        return with_retries(operation, self.retry_policy, what)

    def _commit(self, result: ShardResult) -> None:
        if result.received != result.expected:
            raise RuntimeError(
                f"{result.shard.url}: {result.received} rows arrived for {result.expected} samples; refusing to write"
            )
        if result.status == rows.SHARD_FAILED:
            # No file and no marker: the next run tries the shard again.
            result.finished = True
            return
        table = self._conform(result)
        patch = self.patches.get(result.shard.url)
        if patch is not None:
            table, result.rows_replaced = self._patched(patch, table, result.shard.url)
        final = join(self.root, f"{result.shard.name}.parquet")
        staging = join(self.root, STAGING_DIR, self.run_id, f"{result.shard.name}.parquet")

        def write_staged() -> None:
            self.fs.makedirs(staging.rsplit("/", 1)[0], exist_ok=True)
            with self.fs.open(staging, "wb") as sink:
                pq.write_table(table, sink, compression=self.compression)

        def publish() -> None:
            self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
            self.fs.copy(staging, final)

        self._retry(write_staged, f"staging {staging}")
        faults.inject("driver.commit")
        self._retry(publish, f"committing {final}")
        self._retry(lambda: self._write_marker(result, final, table), f"marking {result.shard.name} done")
        faults.inject("driver.committed")
        try:
            self.fs.rm(staging)
        except Exception as exc:  # the staging prefix is removed at the end of the run anyway
            log.debug("could not remove %s: %s", staging, exc)
        result.output_path = final
        result.rows_written = table.num_rows
        result.finished = True
        result.parts.clear()
        self.committed.append(result)
        log.debug("committed %s (%d rows)", final, table.num_rows)

    def _write_marker(self, result: ShardResult, final: str, table: pa.Table) -> None:
        path = marker_path(self.root, result.shard)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        failed = table.num_rows - (pc.sum(pc.is_null(table.column("error"))).as_py() or 0)
        marker = {
            "shard": result.shard.url,
            "output": final,
            "status": result.status,
            "error": result.error,
            "rows": table.num_rows,
            "failed_rows": failed,
            "run_id": self.run_id,
            "settings_sha256": self.settings_digest,
            "committed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if result.shard.url in self.patches:
            marker["rows_replaced"] = result.rows_replaced
        with self.fs.open(path, "wb") as handle:
            handle.write(json.dumps(marker, indent=2, sort_keys=True).encode())

    def _patched(self, patch: Patch, retried: pa.Table, url: str) -> tuple[pa.Table, int]:
        """The committed rows with each retried sample's row put in its place, by key."""

        def read_existing() -> pa.Table:
            with self.fs.open(patch.existing_path, "rb") as handle:
                return pq.read_table(handle)

        existing = self._retry(read_existing, f"reading {patch.existing_path}").cast(retried.schema)
        position = {key: i for i, key in enumerate(existing.column("key").to_pylist())}
        missing = [key for key in retried.column("key").to_pylist() if key not in position]
        if missing:
            raise RuntimeError(f"{patch.existing_path}: retried samples {missing[:3]} are not in the committed file")
        replaced = pc.is_in(existing.column("key"), value_set=retried.column("key"))
        kept = existing.filter(pc.invert(replaced))
        order = [position[k] for k in kept.column("key").to_pylist()] + [
            position[k] for k in retried.column("key").to_pylist()
        ]
        merged = pa.concat_tables([kept, retried])
        merged = merged.take(pc.sort_indices(pa.array(order, pa.int64())))
        return self.schema.conform(merged, extra_metadata={"run_id": self.run_id, "shard": url}), retried.num_rows

    def _conform(self, result: ShardResult) -> pa.Table:
        if result.parts:
            table = pa.concat_tables(result.parts, promote_options="permissive")
            table = table.take(pc.sort_indices(table.column(rows.INDEX)))
        else:
            table = self.schema.arrow.empty_table()
        for name, value in self.constants.items():
            table = rows.set_column(table, name, pa.array([value] * table.num_rows, self.schema.arrow.field(name).type))
        return self.schema.conform(table, extra_metadata={"run_id": self.run_id, "shard": result.shard.url})

    def cleanup_staging(self) -> None:
        staging = join(self.root, STAGING_DIR, self.run_id)
        try:
            if self.fs.exists(staging):
                self.fs.rm(staging, recursive=True)
        except FileNotFoundError:
            pass
        except Exception as exc:
            log.warning("could not remove the staging prefix %s: %s", staging, exc)
