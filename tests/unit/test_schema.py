"""Unit tests for pipeline.schema: the versioned JSON schema and `conform`."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from importlib import resources
from typing import Any

import pyarrow as pa
import pytest

from pipeline.schema import METADATA_PREFIX, load_schema

SCHEMA = load_schema(2)  # version 3's additions: tests/unit/test_embed_stage.py
NOW = datetime(2026, 11, 1, 12, 30, tzinfo=timezone.utc)

EXPECTED_COLUMNS = [
    "key", "shard", "members", "image_member", "image_format", "image_width", "image_height", "image_sha256",
    "metadata", "caption", "tags", "vqa", "error", "error_reason", "model", "settings", "run_id", "processed_at",
    "prompt_tokens", "generated_tokens", "task_tokens",
]  # fmt: skip
V1_COLUMNS = EXPECTED_COLUMNS[:-3]
NON_NULLABLE = {"key", "shard", "members", "model", "settings", "run_id", "processed_at"}


def row(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "key": "k0",
        "shard": "file:///data/s.tar",
        "members": ["k0.jpg", "k0.json"],
        "image_member": "k0.jpg",
        "image_format": "JPEG",
        "image_width": 64,
        "image_height": 48,
        "image_sha256": "ab" * 32,
        "metadata": '{"a": 1}',
        "caption": "a red square",
        "tags": ["red", "square"],
        "vqa": [{"question": "What shape?", "answer": "square"}],
        "error": None,
        "error_reason": None,
        "model": "org/model",
        "settings": "{}",
        "run_id": "run-1",
        "processed_at": NOW,
        "prompt_tokens": 120,
        "generated_tokens": 9,
        "task_tokens": [
            {"task": "caption", "prompt_tokens": 58, "generated_tokens": 5},
            {"task": "vqa", "prompt_tokens": 62, "generated_tokens": 4},
        ],
    }
    values.update(overrides)
    return values


def exact_table(rows: list[dict[str, Any]], extra: list[pa.Field] | None = None) -> pa.Table:
    schema = pa.schema(list(SCHEMA.arrow) + (extra or []))
    return pa.Table.from_pylist(rows, schema=schema)


def test_schema_json_loads_with_name_version_and_columns() -> None:
    assert SCHEMA.name == "llava-pipeline/enrichment"
    assert SCHEMA.version == 2
    assert SCHEMA.names == EXPECTED_COLUMNS
    assert {c.name for c in SCHEMA.columns if not c.nullable} == NON_NULLABLE
    assert all(c.description for c in SCHEMA.columns)


def test_schema_file_and_loaded_schema_agree() -> None:
    spec = json.loads(resources.files("pipeline._schemas").joinpath("enrichment_v2.json").read_text(encoding="utf-8"))
    assert [c["name"] for c in spec["columns"]] == SCHEMA.names
    assert load_schema(2) is SCHEMA  # cached


def test_version_2_appends_token_columns_to_version_1() -> None:
    """v1 stays loadable, and every v1 column is in v2 unchanged, in the same place: v1 readers keep working."""
    v1 = load_schema(1)
    assert v1.version == 1 and v1.names == V1_COLUMNS
    assert SCHEMA.columns[: len(v1.columns)] == v1.columns
    assert [c.name for c in SCHEMA.columns[len(v1.columns) :]] == ["prompt_tokens", "generated_tokens", "task_tokens"]
    assert all(c.nullable for c in SCHEMA.columns[len(v1.columns) :])
    entry = SCHEMA.arrow.field("task_tokens").type.value_type
    assert [entry.field(i).name for i in range(entry.num_fields)] == ["task", "prompt_tokens", "generated_tokens"]


def test_upgrade_gives_a_version_1_file_the_new_columns_as_nulls() -> None:
    v1 = load_schema(1)
    old = v1.conform(pa.Table.from_pylist([{k: v for k, v in row().items() if k in V1_COLUMNS}]))
    upgraded = SCHEMA.conform(SCHEMA.upgrade(old))
    assert upgraded.column_names == EXPECTED_COLUMNS
    assert upgraded.to_pylist() == [row(prompt_tokens=None, generated_tokens=None, task_tokens=None)]


def test_arrow_types() -> None:
    arrow = SCHEMA.arrow
    assert arrow.field("members").type == pa.list_(pa.string())
    assert arrow.field("image_width").type == pa.int32()
    assert arrow.field("tags").type == pa.list_(pa.string())
    assert arrow.field("processed_at").type == pa.timestamp("us", tz="UTC")
    assert not arrow.field("key").nullable and arrow.field("caption").nullable


def test_vqa_is_a_list_of_question_answer_structs() -> None:
    vqa = SCHEMA.arrow.field("vqa").type
    assert pa.types.is_list(vqa)
    struct = vqa.value_type
    assert pa.types.is_struct(struct)
    assert [struct.field(i).name for i in range(struct.num_fields)] == ["question", "answer"]
    assert all(struct.field(i).type == pa.string() and not struct.field(i).nullable for i in range(2))


def test_arrow_schema_metadata_names_schema_and_version() -> None:
    assert SCHEMA.arrow.metadata == {
        f"{METADATA_PREFIX}schema".encode(): b"llava-pipeline/enrichment",
        f"{METADATA_PREFIX}schema_version".encode(): b"2",
    }


def test_missing_schema_version_raises() -> None:
    with pytest.raises(FileNotFoundError):
        load_schema(999)


# --- conform ---------------------------------------------------------------------------------------


def test_conform_drops_extra_and_internal_columns_and_orders_columns() -> None:
    table = exact_table([row()], extra=[pa.field("_index", pa.int64()), pa.field("_record", pa.string())])
    reordered = table.select(list(reversed(table.column_names)))
    out = SCHEMA.conform(reordered)
    assert out.column_names == EXPECTED_COLUMNS
    assert out.schema.equals(SCHEMA.arrow, check_metadata=True)
    assert out.to_pylist() == [row()]


def test_conform_casts_compatible_types() -> None:
    table = pa.Table.from_pylist([row(), row(key="k1", vqa=None, tags=None)])  # inferred: int64, timestamp tz UTC
    assert table.schema.field("image_width").type == pa.int64()
    table = table.set_column(
        table.schema.get_field_index("processed_at"),
        "processed_at",
        pa.array([NOW, NOW], pa.timestamp("ns", tz="UTC")),
    )
    out = SCHEMA.conform(table)
    assert out.schema.field("image_width").type == pa.int32()
    assert out.schema.field("processed_at").type == pa.timestamp("us", tz="UTC")
    assert out.schema.field("vqa").type == SCHEMA.arrow.field("vqa").type
    assert out.column("image_width").to_pylist() == [64, 64]
    assert out.column("processed_at").to_pylist() == [NOW, NOW]
    assert out.column("vqa").to_pylist() == [[{"question": "What shape?", "answer": "square"}], None]


def test_conform_casts_all_null_columns() -> None:
    table = pa.Table.from_pylist([row(metadata=None, error=None)])
    assert table.schema.field("metadata").type == pa.null()
    out = SCHEMA.conform(table)
    assert out.schema.field("metadata").type == pa.string()
    assert out.column("metadata").to_pylist() == [None]


def test_conform_rejects_missing_columns_naming_them() -> None:
    table = exact_table([row()]).drop_columns(["run_id", "caption"])
    with pytest.raises(ValueError) as info:
        SCHEMA.conform(table)
    assert str(info.value) == "output is missing columns ['caption', 'run_id'] required by llava-pipeline/enrichment v2"


def test_conform_rejects_incompatible_types_naming_the_column() -> None:
    table = pa.Table.from_pylist([row(image_width="wide")])
    with pytest.raises(ValueError, match=r"^column 'image_width': string does not fit int32"):
        SCHEMA.conform(table)


@pytest.mark.parametrize("column", ["key", "model", "processed_at", "members"])
def test_conform_rejects_nulls_in_non_nullable_column(column: str) -> None:
    table = pa.Table.from_pylist([row(), row(**{column: None})])
    with pytest.raises(ValueError) as info:
        SCHEMA.conform(table)
    assert str(info.value) == f"column {column!r} is not nullable but has 1 nulls"


def test_conform_accepts_nulls_in_nullable_columns() -> None:
    nullable = {c.name: None for c in SCHEMA.columns if c.nullable}
    out = SCHEMA.conform(exact_table([row(**nullable)]))
    assert out.to_pylist()[0]["caption"] is None and out.to_pylist()[0]["vqa"] is None


def test_conform_attaches_extra_metadata_with_prefix() -> None:
    out = SCHEMA.conform(exact_table([row()]), extra_metadata={"run_id": "run-1", "shard": "file:///s.tar"})
    assert out.schema.metadata == {
        b"llava_pipeline.schema": b"llava-pipeline/enrichment",
        b"llava_pipeline.schema_version": b"2",
        b"llava_pipeline.run_id": b"run-1",
        b"llava_pipeline.shard": b"file:///s.tar",
    }


def test_conform_empty_table_keeps_schema() -> None:
    out = SCHEMA.conform(SCHEMA.arrow.empty_table())
    assert out.num_rows == 0
    assert out.schema.equals(SCHEMA.arrow, check_metadata=True)


def test_conform_rejects_nulls_in_non_nullable_nested_fields() -> None:
    table = exact_table([row(vqa=None)])
    vqa = pa.array([[{"question": None, "answer": "x"}]], SCHEMA.arrow.field("vqa").type)
    table = table.set_column(table.schema.get_field_index("vqa"), "vqa", vqa)
    with pytest.raises(ValueError, match="vqa"):
        SCHEMA.conform(table)
