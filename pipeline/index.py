"""The search index over an output prefix: a LanceDB database fed from committed shards only, incrementally.

    <index url>/samples.lance   one row per successful sample: key, shard, caption, tags, clip_score, the image and
                                caption embeddings (fixed-size float32 vectors) and where the row came from
    <index url>/shards.lance    one row per shard ingested: its name and the SHA-256 its completion marker vouches
                                for, so the next update knows which shards it has and which changed since

The index lives at `index.url`, by default `<output.url>/_index` (readers of the outputs skip `_` paths), on a
local path or object storage, reached with the job's own storage settings (`lance_storage_options`).

What an update does, and why every key ends up in the index exactly once whatever is killed when:

1. It lists the completion markers (`OutputLayout.committed`): a shard without one is not committed and is not
   read. A shard recorded in `shards` at its marker's SHA-256 is skipped; a shard recorded at another one (its
   file was rewritten by `retry-failed` or `--overwrite`) is replaced; any other shard is added.
2. It reads the footer of every shard to take, and checks the embedding spaces its file declares
   (`llava_pipeline.embeddings`: model and dimension per vector column) against the index's. A shard whose model
   or dimension differs is refused, naming both, before anything is written. A file without embeddings (schema
   v1 and v2) is indexed for full text only: its vectors are null.
3. Per shard, one LanceDB `merge_insert` on (shard_name, key) that updates the rows the index has and inserts the
   others, in one atomic commit (a new table version): a key is never in two rows, and doing it again changes
   nothing. Then a delete of the shard's rows that still carry another version's checksum (`source_sha256`): the
   samples the new file no longer has, or has as failures. Only then is the shard recorded in `shards`. The
   shard's bytes are checked against its marker's SHA-256 before any of it, so only the committed file's rows go
   in. A kill anywhere leaves the shard unrecorded, with each of its keys once, some perhaps from the old version;
   the next update merges and deletes again and records it.
4. Indexes: a full-text index on `caption` and on `tags`, and an IVF_PQ vector index (cosine) on each embedding
   column once it holds `index.vector_index_min_rows` vectors. Once 10,000 rows wait outside an index, or the
   table is in 32 files, `optimize` folds the new rows into the indexes and compacts the files; until then
   searches scan the unindexed rows directly (exact, and fast at that size).

Rows with `error` set (failed samples) are left out: their results are missing or partial. `retry-failed` rewrites
their shard's file, and the next update replaces the shard's rows, taking in the ones that now succeed.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Collection, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import faults, integrity
from pipeline.config import JobConfig, StorageConfig
from pipeline.embedders import EmbeddingSpace
from pipeline.errors import ConfigError, PipelineError
from pipeline.layout import OutputLayout
from pipeline.schema import EMBEDDINGS_KEY, METADATA_PREFIX, VECTOR_COLUMNS
from pipeline.storage import describe_storage_error, join, resolve_storage
from pipeline.urls import protocol_of

log = logging.getLogger(__name__)

INDEX_DIR = "_index"
SAMPLES_TABLE = "samples"
SHARDS_TABLE = "shards"
TEXT_COLUMNS = ("caption", "tags")
IVF_MAX_ITERATIONS = 20
# `optimize` after an update once this many rows are outside an index, or the table is in this many files.
OPTIMIZE_UNINDEXED_ROWS = 10_000
OPTIMIZE_FRAGMENTS = 32
DISTANCE = "cosine"  # embeddings leave the embedders L2-normalised: cosine is their similarity
EMBEDDINGS_METADATA = f"{METADATA_PREFIX}{EMBEDDINGS_KEY}".encode()  # in each output file's Parquet key-value metadata
MODEL_METADATA = b"llava_pipeline.model"  # on each vector field of the index: the model that made its vectors
ROW_IDENTITY = ["shard_name", "key"]  # a WebDataset key is unique within its shard only

_PARALLEL_FOOTERS = 16
_PROGRESS_EVERY_SECONDS = 10.0
_LANCE_PROTOCOLS = ("file", "s3", "s3a", "gs", "gcs", "az", "abfs")

SAMPLE_FIELDS = (
    pa.field("key", pa.string(), nullable=False),
    pa.field("shard_name", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("caption", pa.string()),
    pa.field("tags", pa.string()),
    pa.field("metadata", pa.string()),
    pa.field("image_sha256", pa.string()),
    pa.field("clip_score", pa.float32()),
    pa.field("run_id", pa.string()),
    pa.field("source_sha256", pa.string(), nullable=False),
)
SHARD_SCHEMA = pa.schema(
    [
        pa.field("shard_name", pa.string(), nullable=False),
        pa.field("source_sha256", pa.string(), nullable=False),
        pa.field("rows_indexed", pa.int64(), nullable=False),
        pa.field("rows_left_out", pa.int64(), nullable=False),
        pa.field("full_text_only", pa.bool_(), nullable=False),
        pa.field("indexed_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)


def lancedb_module():
    """lancedb, imported on first use (only the index and search commands need it)."""
    os.environ.setdefault("LANCEDB_LOG", "error")  # its Rust side warns about routine things ("will be created")
    import lancedb

    return lancedb


# --- where the index lives ------------------------------------------------------------------------------------


def lance_storage_options(storage: StorageConfig, url: str) -> dict[str, str]:
    """LanceDB's `storage_options` for `url` from the job's storage settings: the same endpoint, region and
    credentials its fsspec filesystems get (`pipeline.storage.fsspec_options`). Holds secrets: never log it."""
    if protocol_of(url) not in ("s3", "s3a"):
        return {}
    options: dict[str, str] = {}
    if storage.endpoint_url:
        options["aws_endpoint"] = storage.endpoint_url
        if storage.endpoint_url.startswith("http://"):
            options["allow_http"] = "true"  # an S3-compatible server without TLS (MinIO, a local test server)
    region = storage.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["aws_region"] = region
    if storage.anon:
        options["aws_skip_signature"] = "true"
    if storage.access_key_id is not None and storage.secret_access_key is not None:
        options["aws_access_key_id"] = storage.access_key_id.get_secret_value()
        options["aws_secret_access_key"] = storage.secret_access_key.get_secret_value()
        if storage.session_token is not None:
            options["aws_session_token"] = storage.session_token.get_secret_value()
    elif storage.profile:
        # LanceDB's object store reads no AWS config files by name: resolve the profile's keys here.
        import botocore.session

        credentials = botocore.session.Session(profile=storage.profile).get_credentials()
        if credentials is None:
            raise ConfigError(f"storage.profile: profile {storage.profile!r} has no credentials")
        frozen = credentials.get_frozen_credentials()
        options["aws_access_key_id"], options["aws_secret_access_key"] = frozen.access_key, frozen.secret_key
        if frozen.token:
            options["aws_session_token"] = frozen.token
    return options


@dataclass(frozen=True)
class IndexLocation:
    """An index's URL and the storage settings that reach it."""

    url: str
    storage: StorageConfig

    @classmethod
    def of(cls, url: str, storage: StorageConfig | None = None) -> "IndexLocation":
        protocol = protocol_of(url)
        if protocol not in _LANCE_PROTOCOLS:
            raise ConfigError(
                f"index.url: {url!r}: LanceDB cannot keep an index on {protocol}:// (use a local path, s3://, gs:// "
                "or az://)"
            )
        return cls(url=url, storage=resolve_storage(storage or StorageConfig()))

    @classmethod
    def for_job(cls, job: JobConfig) -> "IndexLocation":
        """`index.url`, else `<output.url>/_index`, with `index.storage`, else the output's storage."""
        url = job.index.url or join(job.output.url, INDEX_DIR)
        return cls.of(url, job.index.storage or job.storage_for("output"))

    @property
    def lance_uri(self) -> str:
        protocol = protocol_of(self.url)
        if protocol == "file":
            return os.path.abspath(os.path.expanduser(self.url.removeprefix("file://")))
        if protocol == "s3a":
            return "s3://" + self.url.split("://", 1)[1]
        return self.url.rstrip("/")

    @property
    def is_local(self) -> bool:
        return protocol_of(self.url) == "file"

    def connect(self):
        try:
            return lancedb_module().connect(
                self.lance_uri, storage_options=lance_storage_options(self.storage, self.url) or None
            )
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"index.url: cannot open {describe_lance_error(exc, self)}") from None


def describe_lance_error(exc: BaseException, location: IndexLocation) -> str:
    """One line for an error LanceDB raised at the index (its messages carry a Rust debug dump)."""
    text = str(exc)
    if "NoSuchBucket" in text:
        return f"{location.url}: its bucket does not exist"
    if "AccessDenied" in text or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
        return f"{location.url}: access denied ({text[:200]})"
    first = text.split(" { ", 1)[0] if " { " in text else text
    return describe_storage_error(type(exc)(first[:300]) if first != text else exc, location.url, location.storage)


def open_table(db, name: str):
    """The named table, or None when the database has none by that name."""
    try:
        return db.open_table(name)
    except FileNotFoundError:
        return None
    except ValueError as exc:
        if "not found" in str(exc):  # lancedb: "Table 'samples' was not found"
            return None
        raise


# --- embedding spaces -----------------------------------------------------------------------------------------


def file_spaces(metadata: Mapping[bytes, bytes] | None, columns: list[str]) -> dict[str, EmbeddingSpace]:
    """The embedding spaces an output file declares for its vector columns (`llava_pipeline.embeddings`)."""
    raw = (metadata or {}).get(EMBEDDINGS_METADATA)
    if not raw:
        return {}
    try:
        declared = json.loads(raw)
        return {
            column: EmbeddingSpace(model=str(declared[column]["model"]), dimension=int(declared[column]["dimension"]))
            for column in VECTOR_COLUMNS
            if column in declared and column in columns
        }
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"its llava_pipeline.embeddings metadata is not readable: {exc}") from None


def index_spaces(schema: pa.Schema) -> dict[str, EmbeddingSpace]:
    """The embedding spaces an index holds: per vector field, the model in its metadata and its fixed size."""
    spaces = {}
    for column in VECTOR_COLUMNS:
        if column in schema.names:
            found = schema.field(column)
            model = (found.metadata or {}).get(MODEL_METADATA, b"").decode()
            spaces[column] = EmbeddingSpace(model=model, dimension=found.type.list_size)
    return spaces


def space_conflicts(index: Mapping[str, EmbeddingSpace], shard: Mapping[str, EmbeddingSpace]) -> list[str]:
    """Why a shard's vectors cannot share the index's columns (empty: they can)."""
    problems = []
    for column, theirs in sorted(shard.items()):
        ours = index.get(column)
        if ours is not None and ours != theirs:
            problems.append(
                f"{column}: the shard's vectors are from {theirs.model} ({theirs.dimension} dimensions), the index's "
                f"from {ours.model} ({ours.dimension} dimensions)"
            )
    return problems


def vector_field(column: str, space: EmbeddingSpace) -> pa.Field:
    return pa.field(column, pa.list_(pa.float32(), space.dimension), metadata={MODEL_METADATA: space.model.encode()})


def samples_schema(spaces: Mapping[str, EmbeddingSpace]) -> pa.Schema:
    return pa.schema([*SAMPLE_FIELDS, *(vector_field(c, spaces[c]) for c in VECTOR_COLUMNS if c in spaces)])


# --- rows -----------------------------------------------------------------------------------------------------


def index_rows(
    table: pa.Table,
    *,
    shard_name: str,
    source_sha256: str,
    spaces: Mapping[str, EmbeddingSpace],
    declared: Collection[str] | None = None,
) -> tuple[pa.Table, int]:
    """An output file's rows as index rows (the columns of `samples_schema(spaces)`), and how many were left out.

    Rows with `error` set are left out. Tags become one comma-separated text for full-text search. A vector column
    the index has but the file lacks, or holds without declaring its model (`declared`: the columns its metadata
    names; default all), is null; a vector of the wrong length is a ValueError (a corrupt file)."""
    declared = set(spaces) if declared is None else set(declared)
    if "error" in table.column_names:
        ok = pc.is_null(table.column("error"))
        kept = table.filter(ok)
    else:
        kept = table
    left_out = table.num_rows - kept.num_rows
    n = kept.num_rows

    def column(name: str, kind: pa.DataType) -> pa.Array:
        if name not in kept.column_names:
            return pa.nulls(n, kind)
        return kept.column(name).combine_chunks().cast(kind)

    tags = (
        pc.binary_join(kept.column("tags").combine_chunks(), ", ")
        if "tags" in kept.column_names
        else pa.nulls(n, pa.string())
    )
    arrays: dict[str, pa.Array] = {
        "key": column("key", pa.string()),
        "shard_name": pa.array([shard_name] * n, pa.string()),
        "shard": column("shard", pa.string()),
        "caption": column("caption", pa.string()),
        "tags": tags,
        "metadata": column("metadata", pa.string()),
        "image_sha256": column("image_sha256", pa.string()),
        "clip_score": column("clip_score", pa.float32()),
        "run_id": column("run_id", pa.string()),
        "source_sha256": pa.array([source_sha256] * n, pa.string()),
    }
    for name, space in spaces.items():
        arrays[name] = fixed_size_vectors(
            kept.column(name).combine_chunks() if name in kept.column_names and name in declared else None,
            space.dimension,
            n,
            name,
        )
    schema = samples_schema(spaces)
    return pa.Table.from_arrays([arrays[f.name] for f in schema], schema=schema), left_out


def fixed_size_vectors(values: pa.Array | None, dimension: int, rows: int, name: str) -> pa.FixedSizeListArray:
    """`list<float>` vectors as `fixed_size_list<float32>[dimension]`, nulls kept; other lengths are refused."""
    kind = pa.list_(pa.float32(), dimension)
    if values is None or values.null_count == len(values):
        return pa.nulls(rows, kind)
    valid = pc.is_valid(values)
    lengths = pc.list_value_length(values)
    wrong = pc.sum(pc.and_(valid, pc.not_equal(lengths, dimension))).as_py() or 0
    if wrong:
        raise ValueError(f"{name}: {wrong} vector(s) are not {dimension} long, as the file's metadata says")
    mask = valid.to_numpy(zero_copy_only=False)
    matrix = np.zeros((rows, dimension), np.float32)
    flat = pc.list_flatten(values.filter(valid)).cast(pa.float32()).to_numpy(zero_copy_only=False)
    matrix[mask] = flat.reshape(-1, dimension)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), dimension, mask=pa.array(~mask))


def sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def marker_version(marker: Mapping[str, object]) -> str:
    """What identifies the committed version of a shard's file: its SHA-256 (markers written before checksums
    were recorded: a digest of the marker itself, which a new commit rewrites)."""
    recorded = marker.get(integrity.SHA256)
    if isinstance(recorded, str) and recorded:
        return recorded
    return "marker:" + integrity.keys_digest([json.dumps(marker, sort_keys=True, default=str)])


# --- the update -----------------------------------------------------------------------------------------------


@dataclass
class IndexReport:
    """What an update did; `render()` is what the command prints."""

    url: str
    committed: int = 0
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    skipped: int = 0
    refused: dict[str, str] = field(default_factory=dict)  # shard -> why (nothing of it was written)
    deferred: dict[str, str] = field(default_factory=dict)  # shard -> why it waits for the next update
    full_text_only: list[str] = field(default_factory=list)  # shards without embeddings, indexed for text search
    rows_indexed: int = 0
    rows_left_out: int = 0
    total_rows: int = 0
    indexes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    merge_seconds: float = 0.0  # reading shards and merging their rows
    index_seconds: float = 0.0  # building and optimizing the indexes, compacting the table

    @property
    def ok(self) -> bool:
        return not self.refused

    def to_dict(self) -> dict[str, object]:
        return {
            "url": self.url,
            "committed_shards": self.committed,
            "added": self.added,
            "replaced": self.replaced,
            "skipped": self.skipped,
            "refused": self.refused,
            "deferred": self.deferred,
            "full_text_only": self.full_text_only,
            "rows_indexed": self.rows_indexed,
            "rows_left_out": self.rows_left_out,
            "total_rows": self.total_rows,
            "indexes": self.indexes,
            "seconds": round(self.seconds, 3),
            "merge_seconds": round(self.merge_seconds, 3),
            "index_seconds": round(self.index_seconds, 3),
        }

    def render(self) -> str:
        rate = self.rows_indexed / self.merge_seconds if self.merge_seconds > 0 else 0.0
        lines = [
            f"index {self.url}: {self.committed} committed shard(s): {len(self.added)} added, {len(self.replaced)} "
            f"replaced, {self.skipped} unchanged (skipped), {len(self.refused)} refused, {len(self.deferred)} "
            "deferred",
            f"  rows     {self.rows_indexed} indexed ({rate:.0f} rows/s), {self.rows_left_out} failed sample(s) left "
            f"out; {self.total_rows} in the index",
            f"  indexes  {', '.join(self.indexes) or 'none yet'}",
            f"  time     {self.seconds:.1f} s ({self.merge_seconds:.1f} s merging rows, {self.index_seconds:.1f} s on "
            "indexes and compaction)",
        ]
        if self.full_text_only:
            lines.append(
                f"  note     {len(self.full_text_only)} shard(s) have no embeddings (written before the embed stage, "
                f"or without it): indexed for full-text search only, e.g. {self.full_text_only[0]}"
            )
        for name, why in sorted(self.refused.items()):
            lines.append(f"  refused  {name}: {why}")
        for name, why in sorted(self.deferred.items()):
            lines.append(f"  deferred {name}: {why}")
        return "\n".join(lines)


@dataclass
class _Pending:
    name: str
    version: str
    marker: Mapping[str, object]
    replacing: bool
    spaces: dict[str, EmbeddingSpace] = field(default_factory=dict)


def update_index(job: JobConfig, *, echo: Callable[[str], None] = print) -> IndexReport:
    """Bring the job's index (`index.url`, default `<output.url>/_index`) up to date with its committed shards."""
    output = OutputLayout(job.output.url, resolve_storage(job.storage_for("output")), job.retries)
    return ingest(output, IndexLocation.for_job(job), vector_index_min_rows=job.index.vector_index_min_rows, echo=echo)


def ingest(
    output: OutputLayout,
    location: IndexLocation,
    *,
    vector_index_min_rows: int = 50_000,
    echo: Callable[[str], None] = print,
) -> IndexReport:
    """Bring the index at `location` up to date with the committed shards under `output` (see the module doc)."""
    started = time.perf_counter()
    report = IndexReport(url=location.url)
    names = sorted(output.committed())
    report.committed = len(names)
    db = location.connect()
    samples, shards = open_table(db, SAMPLES_TABLE), open_table(db, SHARDS_TABLE)
    recorded = _recorded_versions(shards)
    markers = output.read_markers(names) if names else {}
    pending = []
    for name in names:
        version = marker_version(markers[name])
        if recorded.get(name) == version:
            report.skipped += 1
        else:
            pending.append(_Pending(name, version, markers[name], replacing=name in recorded))

    # Every file's declared spaces are checked before anything is written.
    spaces = index_spaces(samples.schema) if samples is not None else {}
    accepted = []
    for item, found in zip(pending, _footers(output, [p.name for p in pending])):
        if isinstance(found, str):
            report.refused[item.name] = found
            continue
        conflicts = space_conflicts(spaces, found)
        if conflicts:
            report.refused[item.name] = "; ".join(conflicts) + " (an index holds vectors of one model per column)"
            continue
        item.spaces = found
        for column, space in found.items():
            spaces.setdefault(column, space)
        accepted.append(item)
    if report.refused:
        log.error(
            "%d shard(s) refused: %s", len(report.refused), "; ".join(f"{k}: {v}" for k, v in report.refused.items())
        )
    if accepted:
        echo(f"index {location.url}: {len(accepted)} shard(s) to take, {report.skipped} unchanged")
        samples = _samples_table(db, samples, spaces)
        shards = shards if shards is not None else db.create_table(SHARDS_TABLE, schema=SHARD_SCHEMA)
        merging = time.perf_counter()
        _take(output, accepted, samples, shards, report, echo)
        report.merge_seconds = time.perf_counter() - merging
    if samples is not None:
        maintaining = time.perf_counter()
        report.indexes = _maintain(samples, vector_index_min_rows)
        report.total_rows = samples.count_rows()
        if shards is not None and needs_optimizing(shards, []):
            shards.optimize()
        report.index_seconds = time.perf_counter() - maintaining
    report.seconds = time.perf_counter() - started
    return report


def _recorded_versions(shards) -> dict[str, str]:
    if shards is None:
        return {}
    table = shards.to_arrow().select(["shard_name", "source_sha256"])
    return dict(zip(table.column("shard_name").to_pylist(), table.column("source_sha256").to_pylist()))


def _footers(output: OutputLayout, names: list[str]) -> list[dict[str, EmbeddingSpace] | str]:
    """Per shard, the spaces its file declares, or why it cannot be read (a few KB per file, in parallel)."""

    def read(name: str) -> dict[str, EmbeddingSpace] | str:
        path = output.data_path(name)

        def footer() -> pq.FileMetaData:
            with output.fs.open(path, "rb") as handle:
                return pq.ParquetFile(handle).metadata

        try:
            metadata = output.retry(footer, f"reading {path}'s footer")
            return file_spaces(metadata.metadata, metadata.schema.to_arrow_schema().names)
        except ValueError as exc:
            return str(exc)
        except Exception as exc:
            return f"cannot read its file: {describe_storage_error(exc, path, output.storage)}"

    if not names:
        return []
    with ThreadPoolExecutor(max_workers=min(_PARALLEL_FOOTERS, len(names))) as pool:
        return list(pool.map(read, names))


def _samples_table(db, samples, spaces: Mapping[str, EmbeddingSpace]):
    """The samples table with a vector column for every space: created, or given the columns it lacks (null for
    the rows it holds) in one commit."""
    if samples is None:
        return db.create_table(SAMPLES_TABLE, schema=samples_schema(spaces))
    missing = [vector_field(c, spaces[c]) for c in VECTOR_COLUMNS if c in spaces and c not in samples.schema.names]
    if missing:
        samples.add_columns(missing)
    return samples


def _take(output: OutputLayout, accepted: list[_Pending], samples, shards, report: IndexReport, echo) -> None:
    spaces = index_spaces(samples.schema)
    last = time.monotonic()
    for number, item in enumerate(accepted, 1):
        path = output.data_path(item.name)
        try:
            data = output.read_bytes(path)
        except Exception as exc:
            report.deferred[item.name] = f"cannot read its file: {describe_storage_error(exc, path, output.storage)}"
            continue
        recorded = item.marker.get(integrity.SHA256)
        if isinstance(recorded, str) and integrity.Fingerprint.of(data).sha256 != recorded:
            report.deferred[item.name] = (
                "its file is not the one its marker vouches for (a run is replacing it): the next update takes it"
            )
            continue
        try:
            rows, left_out = index_rows(
                pq.read_table(io.BytesIO(data)),
                shard_name=item.name,
                source_sha256=item.version,
                spaces=spaces,
                declared=item.spaces,
            )
        except (ValueError, pa.ArrowInvalid) as exc:
            report.refused[item.name] = str(exc)
            continue
        # An upsert by (shard_name, key): one atomic commit that reads only the join columns of the table. (A
        # merge that also deletes the rows missing from the source reads every column of every row, vectors
        # included: its time and memory grow with the table.)
        samples.merge_insert(ROW_IDENTITY).when_matched_update_all().when_not_matched_insert_all().execute(
            rows, on_bad_vectors="null"
        )
        faults.inject("index.merged")
        # The shard's rows the new file no longer has (a sample now failed, or gone) are the ones still carrying
        # another version's checksum.
        samples.delete(f"shard_name = {sql_string(item.name)} AND source_sha256 != {sql_string(item.version)}")
        record = pa.Table.from_pylist(
            [
                {
                    "shard_name": item.name,
                    "source_sha256": item.version,
                    "rows_indexed": rows.num_rows,
                    "rows_left_out": left_out,
                    "full_text_only": not item.spaces,
                    "indexed_at": datetime.now(timezone.utc),
                }
            ],
            schema=SHARD_SCHEMA,
        )
        shards.merge_insert("shard_name").when_matched_update_all().when_not_matched_insert_all().execute(record)
        (report.replaced if item.replacing else report.added).append(item.name)
        if not item.spaces:
            report.full_text_only.append(item.name)
        report.rows_indexed += rows.num_rows
        report.rows_left_out += left_out
        if time.monotonic() - last >= _PROGRESS_EVERY_SECONDS:
            last = time.monotonic()
            echo(f"  {number}/{len(accepted)} shard(s) taken, {report.rows_indexed} rows")


def _maintain(samples, vector_index_min_rows: int) -> list[str]:
    """Create the indexes the table is ready for, fold new rows into the existing ones; their names."""
    from lancedb.index import FTS, IvfPq

    existing = {tuple(i.columns): i for i in samples.list_indices()}
    if samples.count_rows() == 0:
        return sorted(i.name for i in existing.values())
    created = False
    for column in TEXT_COLUMNS:
        if (column,) not in existing:
            samples.create_index(column, config=FTS(), replace=True)
            created = True
    for column in VECTOR_COLUMNS:
        if column in samples.schema.names and (column,) not in existing:
            vectors = samples.count_rows(f"{column} IS NOT NULL")
            if vectors >= vector_index_min_rows:
                # 20 k-means iterations instead of LanceDB's 50: training is the one costly step of an update
                # (docs/benchmarks.md), and searches re-rank their candidates by exact distance anyway.
                samples.create_index(
                    column, config=IvfPq(distance_type=DISTANCE, max_iterations=IVF_MAX_ITERATIONS), replace=True
                )
                created = True
    if needs_optimizing(samples, existing.values()):
        samples.optimize()  # new rows into the indexes, small files compacted, versions older than a week removed
        created = True
    if created:
        existing = {tuple(i.columns): i for i in samples.list_indices()}
    return sorted(f"{i.name} ({i.index_type})" for i in existing.values())


def needs_optimizing(table, indexes=None) -> bool:
    """Whether enough rows wait outside the indexes, or enough small files piled up, to be worth an `optimize`
    (it rewrites files and index segments). Until then searches scan the unindexed rows directly, which is as
    exact and, for a few thousand rows, as fast."""
    indexes = table.list_indices() if indexes is None else indexes
    unindexed = max((i.num_unindexed_rows or 0 for i in indexes), default=0)
    fragments = table.stats()["fragment_stats"]["num_fragments"]
    return unindexed >= OPTIMIZE_UNINDEXED_ROWS or fragments >= OPTIMIZE_FRAGMENTS


def index_command_error(report: IndexReport) -> PipelineError | None:
    """The error an update ends with when it refused shards (the others were taken)."""
    if report.ok:
        return None
    return PipelineError(
        f"{len(report.refused)} shard(s) refused (nothing of them was written); the others were indexed"
    )


# --- commands -------------------------------------------------------------------------------------------------


def update_after_run(job: JobConfig, echo: Callable[[str], None] = print) -> IndexReport | None:
    """The end of a run with `index.update_after_run`: the update, whose failure is reported and never fails
    the run (its outputs are committed; the next update takes what this one missed)."""
    try:
        report = update_index(job, echo=echo)
    except Exception as exc:
        log.error(
            "updating the search index failed (the run's outputs are committed; `llava-pipeline index` "
            "takes them later): %s",
            exc,
        )
        return None
    echo(report.render())
    return report


def index_command(args) -> int:
    """`llava-pipeline index JOB.yaml`: exit 0 when every committed shard is in the index (or deferred to the
    next update because a run is rewriting it), 1 when some were refused, 2 when the job or a store is unusable."""
    from pipeline.jobfile import load_job

    job = load_job(args.job, output=args.output)
    updates: dict[str, object] = {}
    if args.index_url:
        updates["url"] = args.index_url
    if args.endpoint_url:
        output_storage = endpoint_override(job.storage_for("output"), args.endpoint_url)
        updates["storage"] = endpoint_override(job.index.storage or job.storage_for("output"), args.endpoint_url)
        job = job.model_copy(update={"output": job.output.model_copy(update={"storage": output_storage})})
    if updates:
        job = job.model_copy(update={"index": job.index.model_copy(update=updates)})
    location = IndexLocation.for_job(job)
    try:
        report = update_index(job, echo=(lambda line: None) if args.json else print)
    except PipelineError:
        raise
    except Exception as exc:  # LanceDB's storage errors (its client already retried transient ones)
        raise PipelineError(f"updating the index failed: {describe_lance_error(exc, location)}") from None
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
    error = index_command_error(report)
    if error is not None:
        import sys

        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


def endpoint_override(storage: StorageConfig, endpoint_url: str) -> StorageConfig:
    """`storage` with the endpoint `--endpoint-url` names, checked like the config field."""
    from pydantic import ValidationError

    try:
        endpoint = StorageConfig(endpoint_url=endpoint_url).endpoint_url
    except ValidationError as exc:
        raise ConfigError(f"--endpoint-url: {exc.errors()[0]['msg']}") from None
    return storage.model_copy(update={"endpoint_url": endpoint})
