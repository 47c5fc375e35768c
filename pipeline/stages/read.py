"""Read stage: a Ray Data datasource over WebDataset tar shards, one read task per shard.

It reads raw bytes only; decoding happens in the prepare stage. Ray's own `read_webdataset`
decodes inside the read task, where one bad member or one odd image size fails the whole shard;
here a bad sample becomes an error row and a broken tar keeps every sample before the break.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline import rows
from pipeline.config import InputConfig, ReadStageConfig, RetryConfig, StorageConfig
from pipeline.environment import torch_marked_absent
from pipeline.metrics import StageMetrics
from pipeline.retry import backoff, is_transient
from pipeline.shards import Shard
from pipeline.storage import describe_storage_error, filesystem

if TYPE_CHECKING:
    from pipeline.plan import Plan

log = logging.getLogger(__name__)

_MAX_BLOCK_BYTES = 64 * 1024 * 1024
_END_OF_ARCHIVE = b"\0" * 1024  # two zero blocks close every complete tar
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class ShardReader:
    """What every read task needs: the job's typed sections, as they are."""

    input: InputConfig
    stage: ReadStageConfig
    storage: StorageConfig
    retries: RetryConfig = RetryConfig()
    # retry-failed: per shard URL, the keys of the only samples to emit (rows keep their tar position)
    selection: dict[str, frozenset[str]] | None = None


class ReadStage:
    """The source stage, declared like the others (`pipeline.stages.STAGES`): it starts the dataset."""

    name = "read"

    def enabled(self, job) -> bool:
        return True

    def add_to(self, dataset, plan: "Plan"):
        import ray.data

        assert dataset is None, "the read stage starts the dataset"
        section = plan.job.stages.read
        reader = ShardReader(
            input=plan.job.input,
            stage=section,
            storage=plan.input_storage,
            retries=plan.job.retries,
            selection=plan.selection,
        )
        return ray.data.read_datasource(
            WebDatasetShards(tuple(plan.shards), reader),
            override_num_blocks=len(plan.shards),
            concurrency=section.concurrency,
            num_cpus=section.num_cpus,
        )


READ = ReadStage()


class WebDatasetShards(Datasource):
    def __init__(self, shards: tuple[Shard, ...], reader: ShardReader):
        super().__init__()
        self._shards = shards
        self._reader = reader

    def get_name(self) -> str:
        return "ReadWebDatasetShards"

    def estimate_inmemory_data_size(self) -> int | None:
        sizes = [s.size for s in self._shards]
        return None if any(s is None for s in sizes) else int(sum(sizes))  # type: ignore[arg-type]

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context=None
    ) -> list[ReadTask]:
        # One task per shard whatever `parallelism` says: the shard is the unit of retry, output and resume.
        return [
            ReadTask(
                functools.partial(_counted_blocks, shard, self._reader),
                BlockMetadata(num_rows=None, size_bytes=shard.size, exec_stats=None, input_files=(shard.url,)),
                schema=rows.READ_SCHEMA,
            )
            for shard in self._shards
        ]


class _TailTrackingReader:
    """A read-only stream that remembers how it began and its last kilobyte.

    Python's tarfile takes a tar cut at (or inside) a member header for a normal end of archive,
    which would report a truncated shard as complete with samples silently missing. A complete
    uncompressed tar ends with two zero blocks; reading the stream to its end and checking its
    tail tells the two apart. Compressed tars need no help: gzip detects truncation itself.
    """

    def __init__(self, raw):
        self.raw = raw
        self.head = b""
        self.tail = b""
        self.name = getattr(raw, "name", None)

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if len(self.head) < 2:
            self.head = (self.head + data)[:2]
        self.tail = (self.tail + data)[-len(_END_OF_ARCHIVE) :]
        return data

    def truncated(self) -> bool:
        while self.read(1 << 20):
            pass
        return self.head != _GZIP_MAGIC and self.tail != _END_OF_ARCHIVE


class _Block:
    """Column lists for one output block, flushed by row count or bytes."""

    def __init__(self) -> None:
        self.columns: dict[str, list[object]] = {f.name: [] for f in rows.READ_SCHEMA}
        self.bytes = 0

    def add(self, **values: object) -> None:
        for name, column in self.columns.items():
            column.append(values.get(name))
        image = values.get(rows.IMAGE_BYTES)
        self.bytes += len(image) if isinstance(image, (bytes, bytearray)) else 0

    def __len__(self) -> int:
        return len(self.columns[rows.RECORD])

    def table(self) -> pa.Table:
        return pa.Table.from_pydict(self.columns, schema=rows.READ_SCHEMA)


def _counted_blocks(shard: Shard, reader: ShardReader) -> Iterator[pa.Table]:
    """`read_shard`'s blocks, each counted in the live metrics as the read stage's batch."""
    metrics = StageMetrics.current(READ.name)
    last = time.perf_counter()
    for table in read_shard(shard, reader):
        now = time.perf_counter()
        metrics.received(table)
        metrics.handed_on(table, table.column("error_reason").to_pylist(), now - last)
        last = now
        yield table


def read_shard(shard: Shard, reader: ShardReader) -> Iterator[pa.Table]:
    """Stream one shard's samples as blocks, then its `shard_end` row.

    A transient storage error (dropped connection, 503) reopens the shard and skips the samples
    already emitted, so rows are neither lost nor repeated. Each sample is held back until the next
    one begins, because webdataset yields whatever it had gathered when a stream breaks: a sample
    cut by a transient error is read again whole on the next try.
    """
    tar_file_expander, group_by_keys = tar_iterators()

    started = time.perf_counter()
    retries = reader.retries
    failures: list[str] = []
    count = 0  # samples emitted
    consumed = 0  # samples of the tar dealt with (emitted, or skipped by a retry-failed selection)
    wanted = reader.selection.get(shard.url) if reader.selection is not None else None
    block = _Block()

    def take(sample: dict[str, object], position: int) -> bool:
        nonlocal count
        if wanted is not None and str(sample["__key__"]) not in wanted:
            return False
        block.add(**_sample_row(sample, shard.url, position, reader.input))
        count += 1
        return True

    for attempt in range(1, retries.attempts + 1):
        errors: list[tuple[Exception, str]] = []  # (error, its description)
        held: tuple[int, dict[str, object]] | None = None
        already = consumed

        def on_error(exc: Exception, errors=errors) -> bool:
            message = str(exc.args[0]) if exc.args else type(exc).__name__
            if "duplicate file name" in message:
                return True  # keep the sample with the first copy; the tar is otherwise readable
            errors.append((exc, f"{type(exc).__name__}: {message.split(' @ ')[0]}"))
            return False

        truncated = False
        try:
            fs, path = filesystem(shard.url, reader.storage)
            with fs.open(path, "rb") as raw:
                stream = _TailTrackingReader(raw)
                files = tar_file_expander([{"url": shard.url, "stream": stream}], handler=on_error)
                for position, sample in enumerate(group_by_keys(files, lcase=False, handler=on_error)):
                    if position < already:
                        continue  # emitted before a retry
                    if held is not None:
                        take(held[1], held[0])
                        consumed = held[0] + 1
                        if len(block) >= reader.stage.rows_per_block or block.bytes >= _MAX_BLOCK_BYTES:
                            yield block.table()
                            block = _Block()
                    held = (position, sample)
                if not errors:
                    truncated = stream.truncated()
        except Exception as exc:
            errors.append((exc, describe_storage_error(exc, shard.url, reader.storage)))

        if errors and attempt < retries.attempts and any(is_transient(e) for e, _ in errors):
            log.warning("%s: %s; reading it again from sample %d", shard.url, errors[0][1], consumed)
            time.sleep(backoff(retries, attempt - 1))
            continue  # the held sample is dropped: it may have been cut short
        if held is not None:
            take(held[1], held[0])
        failures.extend(description for _, description in errors)
        if truncated:
            failures.append("the tar ends without its end-of-archive blocks: the shard is truncated")
        break

    status = rows.SHARD_OK if not failures else rows.SHARD_PARTIAL if count else rows.SHARD_FAILED
    block.add(
        **{
            rows.RECORD: rows.SHARD_END,
            "shard": shard.url,
            rows.SHARD_SAMPLES: count,
            rows.SHARD_STATUS: status,
            rows.SHARD_ERROR: "; ".join(failures) or None,
            rows.seconds_column("read"): time.perf_counter() - started,
        }
    )
    yield block.table()


def tar_iterators():
    """webdataset's tar member and sample iterators, imported without torch where torch is not loaded yet.

    Imported here, in the read task only, and with torch marked absent (`torch_marked_absent`): webdataset imports
    torch when it is installed, only for its DataLoader and Tensor stand-ins, which walking a tar never uses. In a
    read worker that cost 1-2 s of CPU (on a node that is starting its model actors) and about 240 MB, per worker.
    """
    if "webdataset" not in sys.modules:
        with torch_marked_absent():
            import webdataset.tariterators  # noqa: F401
    from webdataset.tariterators import group_by_keys, tar_file_expander

    return tar_file_expander, group_by_keys


def _find_member(suffixes: list[str], extensions: tuple[str, ...]) -> str | None:
    """The first suffix matching the preferred extension, case-insensitively.

    WebDataset keys end at the first dot of a file name, so `photo.v2.jpg` has the suffix `v2.jpg`;
    an exact suffix match wins, then a match on the last component, as webdataset's decoders do.
    """
    lowered = [s.lower() for s in suffixes]
    for extension in extensions:
        extension = extension.lower()
        for suffix, low in zip(suffixes, lowered):
            if low == extension:
                return suffix
        for suffix, low in zip(suffixes, lowered):
            if low.rsplit(".", 1)[-1] == extension:
                return suffix
    return None


def _sample_row(sample: dict[str, object], shard_url: str, index: int, config: InputConfig) -> dict[str, object]:
    key = str(sample["__key__"])
    suffixes = [s for s in sample if not s.startswith("__")]
    image_suffix = _find_member(suffixes, tuple(config.image_extensions))
    metadata_suffix = _find_member(suffixes, (config.metadata_extension,)) if config.metadata_extension else None
    image = sample[image_suffix] if image_suffix else None
    metadata = sample[metadata_suffix] if metadata_suffix else None

    row: dict[str, object] = {
        rows.RECORD: rows.SAMPLE,
        "shard": shard_url,
        "key": key,
        rows.INDEX: index,
        "members": [f"{key}.{s}" for s in suffixes],
        "image_member": f"{key}.{image_suffix}" if image_suffix else None,
        rows.IMAGE_BYTES: image,
        "image_sha256": hashlib.sha256(image).hexdigest() if isinstance(image, bytes) else None,
        "metadata": metadata.decode("utf-8", errors="replace") if isinstance(metadata, bytes) else None,
    }
    if image_suffix is None:
        found = ", ".join(suffixes) or "nothing"
        row["error"] = f"no image member (looked for {', '.join(config.image_extensions)}; found {found})"
        row["error_reason"] = "no_image"
    return row
