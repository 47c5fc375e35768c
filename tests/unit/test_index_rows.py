"""The search index's pure pieces on literal tables: rows, embedding spaces, storage options, report."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import JobConfig, StorageConfig
from pipeline.embedders import EmbeddingSpace
from pipeline.errors import ConfigError
from pipeline.index import (
    MODEL_METADATA,
    IndexLocation,
    IndexReport,
    file_spaces,
    fixed_size_vectors,
    index_rows,
    index_spaces,
    lance_storage_options,
    marker_version,
    samples_schema,
    space_conflicts,
    sql_string,
)
from pipeline.testing.outputs import enrichment_table

CLIP = EmbeddingSpace("models/tiny-clip", 4)
MINILM = EmbeddingSpace("all-MiniLM-L6-v2", 3)


def literal_output(**overrides) -> pa.Table:
    values = dict(
        shard="s3://in/shard-7.tar",
        keys=["a", "b", "c"],
        captions=["a red star", "a blue circle", None],
        tags=[["red", "star"], None, ["x"]],
        errors=[None, None, "cannot decode"],
        vectors={
            "image_embedding": np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], np.float32),
            "caption_embedding": np.array([[1, 0, 0], [np.nan, np.nan, np.nan], [0, 0, 1]], np.float32),
        },
        spaces={"image_embedding": CLIP, "caption_embedding": MINILM},
    )
    values.update(overrides)
    return enrichment_table(**values)


def test_rows_leave_out_failed_samples_and_keep_text_and_vectors():
    table = literal_output()
    rows, left_out = index_rows(
        table, shard_name="shard-7", source_sha256="abc", spaces=file_spaces(table.schema.metadata, table.column_names)
    )
    assert left_out == 1
    assert rows.schema.equals(samples_schema({"image_embedding": CLIP, "caption_embedding": MINILM}))
    assert rows.select(["key", "shard_name", "shard", "caption", "tags", "source_sha256"]).to_pylist() == [
        {
            "key": "a",
            "shard_name": "shard-7",
            "shard": "s3://in/shard-7.tar",
            "caption": "a red star",
            "tags": "red, star",
            "source_sha256": "abc",
        },
        {
            "key": "b",
            "shard_name": "shard-7",
            "shard": "s3://in/shard-7.tar",
            "caption": "a blue circle",
            "tags": None,
            "source_sha256": "abc",
        },
    ]
    assert rows.column("image_embedding").to_pylist() == [[1, 0, 0, 0], [0, 1, 0, 0]]
    assert rows.column("caption_embedding").to_pylist() == [[1, 0, 0], None]  # a null vector stays null
    assert rows.column("clip_score").to_pylist() == [1.0, 0.0]


def test_v2_file_gets_null_vectors_for_the_index_columns():
    table = literal_output(vectors=None, spaces=None)
    assert file_spaces(table.schema.metadata, table.column_names) == {}
    rows, _ = index_rows(table, shard_name="s", source_sha256="x", spaces={"image_embedding": CLIP})
    assert rows.column("image_embedding").to_pylist() == [None, None]
    assert rows.column("clip_score").to_pylist() == [None, None]


def test_vectors_whose_model_the_file_does_not_declare_are_left_null():
    table = literal_output()
    rows, _ = index_rows(table, shard_name="s", source_sha256="x", spaces={"image_embedding": CLIP}, declared=[])
    assert rows.column("image_embedding").to_pylist() == [None, None]


def test_v1_file_is_indexed_for_text():
    from pipeline.schema import load_schema

    v1 = literal_output(vectors=None, spaces=None).select(load_schema(1).names)
    rows, left_out = index_rows(v1, shard_name="s", source_sha256="x", spaces={"caption_embedding": MINILM})
    assert (rows.num_rows, left_out) == (2, 1)
    assert rows.column("caption").to_pylist() == ["a red star", "a blue circle"]
    assert rows.column("caption_embedding").null_count == 2


def test_vector_of_the_wrong_length_is_refused():
    values = pa.array([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0]], pa.list_(pa.float32()))
    with pytest.raises(ValueError, match="image_embedding: 1 vector\\(s\\) are not 4 long"):
        fixed_size_vectors(values, 4, 2, "image_embedding")
    assert fixed_size_vectors(pa.array([None, None], pa.list_(pa.float32())), 4, 2, "v").null_count == 2


def test_spaces_from_file_metadata_and_from_the_index_schema():
    declared = {"image_embedding": {"model": "m", "dimension": 4}, "clip_score": {"model": "m"}}
    metadata = {b"llava_pipeline.embeddings": json.dumps(declared).encode()}
    assert file_spaces(metadata, ["key", "image_embedding"]) == {"image_embedding": EmbeddingSpace("m", 4)}
    with pytest.raises(ValueError, match="not readable"):
        file_spaces({b"llava_pipeline.embeddings": b'{"image_embedding": {}}'}, ["image_embedding"])
    schema = samples_schema({"caption_embedding": MINILM})
    assert schema.field("caption_embedding").metadata == {MODEL_METADATA: b"all-MiniLM-L6-v2"}
    assert index_spaces(schema) == {"caption_embedding": MINILM}


def test_conflicts_name_both_models_and_dimensions():
    assert space_conflicts({"image_embedding": CLIP}, {"image_embedding": CLIP, "caption_embedding": MINILM}) == []
    other = EmbeddingSpace("openai/clip-vit-base-patch32", 512)
    assert space_conflicts({"image_embedding": CLIP}, {"image_embedding": other}) == [
        "image_embedding: the shard's vectors are from openai/clip-vit-base-patch32 (512 dimensions), the index's "
        "from models/tiny-clip (4 dimensions)"
    ]


def test_marker_version_is_the_files_checksum():
    assert marker_version({"sha256": "f00d", "rows": 3}) == "f00d"
    old = marker_version({"rows": 3, "committed_at": "2026-01-01"})
    assert old.startswith("marker:") and old != marker_version({"rows": 3, "committed_at": "2026-01-02"})


def test_sql_string_quotes():
    assert sql_string("it's") == "'it''s'"


def test_lance_storage_options_follow_the_jobs_storage(monkeypatch):
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    storage = StorageConfig(
        endpoint_url="http://127.0.0.1:9000",
        region="eu-west-1",
        access_key_id="k",
        secret_access_key="s",
        session_token="t",
    )
    assert lance_storage_options(storage, "s3://b/out/_index") == {
        "aws_endpoint": "http://127.0.0.1:9000",
        "allow_http": "true",
        "aws_region": "eu-west-1",
        "aws_access_key_id": "k",
        "aws_secret_access_key": "s",
        "aws_session_token": "t",
    }
    assert lance_storage_options(StorageConfig(anon=True), "s3://b/x") == {"aws_skip_signature": "true"}
    assert lance_storage_options(storage, "/local/index") == {}


def test_index_location_defaults_next_to_the_outputs():
    job = JobConfig.model_validate(
        {
            "name": "j",
            "input": {"urls": ["s3://b/in/*.tar"]},
            "output": {"url": "s3://b/out/", "storage": {"endpoint_url": "http://minio:9000"}},
            "model": {"source": "m"},
            "tasks": {"caption": {}},
        }
    )
    location = IndexLocation.for_job(job)
    assert location.url == "s3://b/out/_index" and location.storage.endpoint_url == "http://minio:9000"
    moved = job.model_copy(update={"index": job.index.model_copy(update={"url": "/srv/index"})})
    assert IndexLocation.for_job(moved).url == "/srv/index"
    with pytest.raises(ConfigError, match="LanceDB cannot keep an index on memory://"):
        IndexLocation.of("memory://x")


def test_report_renders_counts_and_refusals():
    report = IndexReport(
        url="s3://b/out/_index",
        committed=4,
        added=["a"],
        replaced=["b"],
        skipped=1,
        refused={"c": "image_embedding: ..."},
        rows_indexed=10,
        rows_left_out=2,
        total_rows=30,
        indexes=["caption_idx (FTS)"],
        seconds=3.0,
        merge_seconds=2.0,
    )
    text = report.render()
    assert "4 committed shard(s): 1 added, 1 replaced, 1 unchanged (skipped), 1 refused, 0 deferred" in text
    assert "10 indexed (5 rows/s), 2 failed sample(s) left out; 30 in the index" in text
    assert "refused  c: image_embedding: ..." in text
    assert not report.ok
