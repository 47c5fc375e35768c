"""Driver-side output: one Parquet file per input shard, written when the shard is complete.

Rows reach the driver in whatever order Ray Data finishes them. The committer buffers each
shard's rows until the shard's `shard_end` row has said how many samples it holds and that many
have arrived, then writes the shard's file under a staging prefix and moves it to its final,
deterministic name. Readers that skip `_`-prefixed paths (pyarrow, Spark, DuckDB) never see a
partial file, and a rerun writes the same names again instead of adding duplicates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import rows
from pipeline.schema import OutputSchema
from pipeline.shards import Shard
from pipeline.storage import join

log = logging.getLogger(__name__)

STAGING_DIR = "_staging"
RUNS_DIR = "_runs"


@dataclass
class ShardResult:
    """What the driver learned about one shard: its status from the read stage, its rows from all."""

    shard: Shard
    expected: int | None = None
    status: str | None = None
    error: str | None = None
    parts: list[pa.Table] = field(default_factory=list)
    received: int = 0
    output_path: str | None = None
    finished: bool = False

    @property
    def complete(self) -> bool:
        return self.expected is not None and self.received >= self.expected


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
    ):
        self.fs = fs
        self.root = root.rstrip("/")
        self.schema = schema
        self.constants = constants
        self.run_id = run_id
        self.compression = None if compression == "none" else compression
        self.results = {s.url: ShardResult(s) for s in shards}
        self.committed: list[ShardResult] = []

    def add(self, table: pa.Table) -> list[ShardResult]:
        """Take a batch of finished rows; returns the shards this batch completed and committed."""
        ends = table.filter(pc.equal(table.column(rows.RECORD), rows.SHARD_END))
        for end in ends.to_pylist():
            result = self.results[end["shard"]]
            result.expected = end[rows.SHARD_SAMPLES]
            result.status = end[rows.SHARD_STATUS]
            result.error = end[rows.SHARD_ERROR]

        samples = table.filter(pc.equal(table.column(rows.RECORD), rows.SAMPLE))
        touched = set(ends.column("shard").to_pylist())
        if samples.num_rows:
            shard_column = samples.column("shard")
            for url in pc.unique(shard_column).to_pylist():
                part = samples.filter(pc.equal(shard_column, url))
                result = self.results[url]
                if result.finished:
                    raise RuntimeError(f"{url}: {part.num_rows} row(s) arrived after the shard was committed")
                result.parts.append(part)
                result.received += part.num_rows
                touched.add(url)

        done = []
        for url in sorted(touched):
            result = self.results[url]
            if result.complete and not result.finished:
                self._commit(result)
                done.append(result)
        return done

    def unfinished(self) -> list[ShardResult]:
        return [r for r in self.results.values() if not r.finished]

    def _commit(self, result: ShardResult) -> None:
        if result.received != result.expected:
            raise RuntimeError(
                f"{result.shard.url}: {result.received} rows arrived for {result.expected} samples; refusing to write"
            )
        if result.status == rows.SHARD_FAILED:
            result.finished = True
            return
        table = self._conform(result)
        final = join(self.root, f"{result.shard.name}.parquet")
        staging = join(self.root, STAGING_DIR, self.run_id, f"{result.shard.name}.parquet")
        self.fs.makedirs(staging.rsplit("/", 1)[0], exist_ok=True)
        with self.fs.open(staging, "wb") as sink:
            pq.write_table(table, sink, compression=self.compression)
        self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        self.fs.mv(staging, final)
        result.output_path = final
        result.finished = True
        result.parts.clear()
        self.committed.append(result)
        log.debug("committed %s (%d rows)", final, table.num_rows)

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
