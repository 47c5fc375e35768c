"""Committed output files made from literal values, for the index's tests and benchmark.

A file is committed the way the driver's committer commits one (`pipeline.writer`): staged, published, then its
completion marker written last with the file's size, SHA-256, ETag and key digest, all through `OutputLayout`.
Its rows carry the schema's columns (version 2) and, where vectors are given, the embedding columns of schema
version 3 with the `llava_pipeline.embeddings` metadata that names their models.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa

from pipeline import integrity
from pipeline.embedders import EmbeddingSpace
from pipeline.layout import OutputLayout
from pipeline.schema import METADATA_PREFIX, load_schema


def enrichment_table(
    *,
    shard: str,
    keys: Sequence[str],
    captions: Sequence[str | None],
    tags: Sequence[Sequence[str] | None] | None = None,
    errors: Sequence[str | None] | None = None,
    metadata: Sequence[str | None] | None = None,
    vectors: Mapping[str, np.ndarray] | None = None,
    spaces: Mapping[str, EmbeddingSpace] | None = None,
    run_id: str = "literal",
) -> pa.Table:
    """An output file's rows: schema v2's columns, then `vectors` (column -> (n, dim) array; NaN rows become null)
    with `clip_score` and the metadata of `spaces`."""
    n = len(keys)
    errors = list(errors) if errors is not None else [None] * n
    now = datetime.now(timezone.utc)
    values: dict[str, object] = {
        "key": list(keys),
        "shard": [shard] * n,
        "members": [[f"{k}.png"] for k in keys],
        "image_member": [f"{k}.png" for k in keys],
        "image_format": ["PNG"] * n,
        "image_width": [32] * n,
        "image_height": [32] * n,
        "image_sha256": [hashlib.sha256(f"{shard}/{k}".encode()).hexdigest() for k in keys],
        "metadata": list(metadata) if metadata is not None else [None] * n,
        "caption": [None if e else c for c, e in zip(captions, errors)],
        "tags": [None if e else t for t, e in zip(tags or [None] * n, errors)],
        "vqa": [None] * n,
        "error": errors,
        "error_reason": ["corrupt_image" if e else None for e in errors],
        "model": ["literal-model"] * n,
        "settings": ["{}"] * n,
        "run_id": [run_id] * n,
        "processed_at": [now] * n,
    }
    v2 = load_schema(2)
    table = v2.conform(pa.table({c.name: pa.array(values.get(c.name, [None] * n), c.type) for c in v2.columns}))
    if not vectors:
        return table
    declared: dict[str, object] = {}
    for column, matrix in vectors.items():
        table = table.append_column(pa.field(column, pa.list_(pa.float32())), list_vectors(matrix))
        space = (spaces or {})[column]
        declared[column] = {"model": space.model, "dimension": space.dimension}
    if "image_embedding" in vectors:
        image = np.asarray(vectors["image_embedding"])
        scores = pa.array(image[:, 0].astype(np.float32), pa.float32(), mask=np.isnan(image).any(axis=1))
        table = table.append_column(pa.field("clip_score", pa.float32()), scores)
        declared["clip_score"] = {"model": (spaces or {})["image_embedding"].model}
    schema_metadata = dict(table.schema.metadata or {})
    schema_metadata[f"{METADATA_PREFIX}schema_version".encode()] = b"3"
    schema_metadata[f"{METADATA_PREFIX}embeddings".encode()] = json.dumps(declared).encode()
    return table.replace_schema_metadata(schema_metadata)


def commit_file(layout: OutputLayout, name: str, table: pa.Table, run_id: str = "literal") -> dict[str, object]:
    """Stage, publish and mark `table` as shard `name`'s committed file; returns the marker written."""
    staged = layout.stage(run_id, name, table, "zstd")
    committed = layout.publish(staged, name)
    marker: dict[str, object] = {
        "shard": table.column("shard")[0].as_py() if table.num_rows else name,
        "output": committed.path,
        "status": "ok",
        "error": None,
        "rows": table.num_rows,
        "run_id": run_id,
        "committed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **integrity.marker_fields(committed.fingerprint, committed.etag, table.column("key").to_pylist()),
    }
    layout.write_marker(name, marker)
    layout.discard(staged.path)
    return marker


def list_vectors(matrix: np.ndarray) -> pa.ListArray:
    """(n, dim) float rows as `list<float32>`, a row holding a NaN as null (built without Python lists: the
    benchmark writes millions of floats)."""
    matrix = np.asarray(matrix, dtype=np.float32)
    n, dimension = matrix.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * dimension)
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1)), mask=pa.array(np.isnan(matrix).any(axis=1)))
