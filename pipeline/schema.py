"""The versioned output schema, loaded from `schemas/` and enforced on every write.

The JSON file is the single definition: column names, Arrow types, nullability and the docs the
README shows. Writers never infer types from data, so every file of a version reads back alike.

From version 3 some columns are optional (`"optional": true`): a job writes only those it configures
(the embedding columns), so a file's columns are the version's required ones plus the optional ones
it holds (`OutputSchema.for_columns`); `schema_for` picks the version and columns a job writes. A
file with embedding columns also records which model made each and its dimension
(`llava_pipeline.embeddings`, see `embeddings_metadata`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources
from typing import Iterable, Mapping

import pyarrow as pa
import pyarrow.compute as pc

CURRENT_VERSION = 3
METADATA_PREFIX = "llava_pipeline."
# What a job without optional columns writes: a file without embeddings stays version 2.
BASE_VERSION = 2
EMBEDDINGS_KEY = "embeddings"
# The vector columns (list<float32>), whose dimension the embeddings metadata records.
VECTOR_COLUMNS = ("image_embedding", "caption_embedding")

_PRIMITIVES = {
    "string": pa.string(),
    "binary": pa.binary(),
    "bool": pa.bool_(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "timestamp[us, UTC]": pa.timestamp("us", tz="UTC"),
}


def _arrow_type(spec: object) -> pa.DataType:
    if isinstance(spec, str):
        if spec not in _PRIMITIVES:
            raise ValueError(f"unknown column type {spec!r} (known: {', '.join(_PRIMITIVES)})")
        return _PRIMITIVES[spec]
    if isinstance(spec, dict) and len(spec) == 1:
        ((kind, inner),) = spec.items()
        if kind == "list":
            return pa.list_(_arrow_type(inner))
        if kind == "struct":
            return pa.struct([_arrow_field(f) for f in inner])
    raise ValueError(f"bad column type {spec!r}")


def _arrow_field(spec: dict) -> pa.Field:
    return pa.field(spec["name"], _arrow_type(spec["type"]), nullable=bool(spec.get("nullable", True)))


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    nullable: bool
    description: str
    optional: bool = False  # present only in files of jobs that configure it


@dataclass(frozen=True)
class OutputSchema:
    name: str
    version: int
    description: str
    columns: tuple[Column, ...]

    @property
    def arrow(self) -> pa.Schema:
        return pa.schema(
            [pa.field(c.name, c.type, nullable=c.nullable) for c in self.columns],
            metadata={
                f"{METADATA_PREFIX}schema": self.name,
                f"{METADATA_PREFIX}schema_version": str(self.version),
            },
        )

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def optional_names(self) -> list[str]:
        return [c.name for c in self.columns if c.optional]

    def for_columns(self, present: Iterable[str]) -> "OutputSchema":
        """This version as a file holding the optional columns among `present` (and every required one)."""
        keep = set(present)
        return replace(self, columns=tuple(c for c in self.columns if not c.optional or c.name in keep))

    def upgrade(self, table: pa.Table) -> pa.Table:
        """A table written under an earlier version with this version's added columns, null: each version
        only appends nullable columns, so an old file's rows stay valid rows of the new version."""
        for column in self.columns:
            if column.name not in table.column_names:
                if not column.nullable:
                    raise ValueError(
                        f"column {column.name!r} is missing and not nullable in {self.name} v{self.version}"
                    )
                table = table.append_column(pa.field(column.name, column.type), pa.nulls(table.num_rows, column.type))
        return table

    def conform(self, table: pa.Table, *, extra_metadata: dict[str, str] | None = None) -> pa.Table:
        """Exactly this schema's columns, types and nullability, or a ValueError naming the column.

        Extra columns are dropped (internal `_` columns travel with rows until here); a missing,
        mistyped or wrongly null column is a bug in the pipeline and must not reach a file.
        """
        missing = [n for n in self.names if n not in table.column_names]
        if missing:
            raise ValueError(f"output is missing columns {missing} required by {self.name} v{self.version}")
        arrays = []
        for column in self.columns:
            values = table.column(column.name)
            if not values.type.equals(column.type):
                try:
                    values = values.cast(column.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise ValueError(
                        f"column {column.name!r}: {values.type} does not fit {column.type}: {exc}"
                    ) from None
            if not column.nullable and values.null_count:
                raise ValueError(f"column {column.name!r} is not nullable but has {values.null_count} nulls")
            for chunk in values.chunks:
                nested = _nested_null_violation(chunk, column.name)
                if nested:
                    raise ValueError(f"{nested} is not nullable but has nulls")
            arrays.append(values)
        schema = self.arrow
        if extra_metadata:
            schema = schema.with_metadata(
                {**schema.metadata, **{f"{METADATA_PREFIX}{k}".encode(): v.encode() for k, v in extra_metadata.items()}}
            )
        return pa.Table.from_arrays(arrays, schema=schema)


def _nested_null_violation(values: pa.Array, path: str) -> str | None:
    """The first non-nullable field inside lists and structs that holds a null where its parent does not."""
    kind = values.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        items = values.flatten()
        if not kind.value_field.nullable and items.null_count:
            return f"{path}[]"
        return _nested_null_violation(items, f"{path}[]")
    if pa.types.is_struct(kind):
        parent_valid = pc.is_valid(values)
        for field, child in zip(kind, values.flatten()):
            child_path = f"{path}.{field.name}"
            if not field.nullable and pc.any(pc.and_(pc.is_null(child), parent_valid)).as_py():
                return child_path
            found = _nested_null_violation(child, child_path)
            if found:
                return found
    return None


def schema_text(version: int = CURRENT_VERSION) -> str:
    """The schema file itself, as shipped in `schemas/` (installed as `pipeline._schemas`)."""
    return resources.files("pipeline._schemas").joinpath(f"enrichment_v{version}.json").read_text(encoding="utf-8")


@lru_cache(maxsize=None)
def load_schema(version: int = CURRENT_VERSION) -> OutputSchema:
    spec = json.loads(schema_text(version))
    columns = tuple(
        Column(
            name=c["name"],
            type=_arrow_type(c["type"]),
            nullable=bool(c["nullable"]),
            description=c["description"],
            optional=bool(c.get("optional", False)),
        )
        for c in spec["columns"]
    )
    return OutputSchema(
        name=spec["name"], version=int(spec["version"]), description=spec["description"], columns=columns
    )


def schema_for(optional_columns: Iterable[str] = ()) -> OutputSchema:
    """The schema a job writes: version 2 without optional columns, else the newest version with just those."""
    wanted = list(optional_columns)
    if not wanted:
        return load_schema(BASE_VERSION)
    schema = load_schema(CURRENT_VERSION)
    unknown = sorted(set(wanted) - set(schema.optional_names))
    if unknown:
        raise ValueError(f"{unknown} are not optional columns of {schema.name} v{schema.version}")
    return schema.for_columns(wanted)


def embeddings_metadata(table: pa.Table, models: Mapping[str, str]) -> dict[str, dict[str, object]]:
    """`llava_pipeline.embeddings` for a table: per embedding column it holds, the model that made it (`models`:
    column -> model as the job names it) and, for vector columns, the vectors' length (None when no row has
    one). A column whose vectors differ in length (two models' rows in one file) is a ValueError."""
    spaces: dict[str, dict[str, object]] = {}
    for column, model in models.items():
        if column not in table.column_names:
            continue
        entry: dict[str, object] = {"model": model}
        if column in VECTOR_COLUMNS:
            lengths = pc.unique(pc.list_value_length(table.column(column)).drop_null()).to_pylist()
            if len(lengths) > 1:
                raise ValueError(
                    f"column {column!r} holds vectors of lengths {sorted(lengths)}: rows of different models"
                )
            entry["dimension"] = lengths[0] if lengths else None
        spaces[column] = entry
    return spaces


def read_embeddings_metadata(schema: pa.Schema) -> dict[str, dict[str, object]]:
    """What a file's metadata says about its embedding columns ({} for files without embeddings, v1 and v2)."""
    raw = (schema.metadata or {}).get(f"{METADATA_PREFIX}{EMBEDDINGS_KEY}".encode())
    return json.loads(raw) if raw else {}


def embeddings_problems(table: pa.Table) -> list[str]:
    """How a file's embedding columns disagree with its `llava_pipeline.embeddings` metadata, if they do."""
    columns = [name for name in load_schema(CURRENT_VERSION).optional_names if name in table.column_names]
    if not columns:
        return []
    try:
        recorded = read_embeddings_metadata(table.schema)
    except ValueError as exc:
        return [f"{METADATA_PREFIX}{EMBEDDINGS_KEY} is not JSON: {exc}"]
    problems = []
    for column in columns:
        entry = recorded.get(column)
        if not isinstance(entry, dict) or not entry.get("model"):
            problems.append(f"column {column!r} has no model in {METADATA_PREFIX}{EMBEDDINGS_KEY}")
            continue
        if column in VECTOR_COLUMNS:
            lengths = set(pc.unique(pc.list_value_length(table.column(column)).drop_null()).to_pylist())
            if lengths and lengths != {entry.get("dimension")}:
                problems.append(
                    f"column {column!r} holds vectors of length {sorted(lengths)}, the metadata says "
                    f"{entry.get('dimension')}"
                )
    return problems
