"""The versioned output schema, loaded from `schemas/` and enforced on every write.

The JSON file is the single definition: column names, Arrow types, nullability and the docs the
README shows. Writers never infer types from data, so every file of a version reads back alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import pyarrow as pa
import pyarrow.compute as pc

CURRENT_VERSION = 2
METADATA_PREFIX = "llava_pipeline."

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
        )
        for c in spec["columns"]
    )
    return OutputSchema(
        name=spec["name"], version=int(spec["version"]), description=spec["description"], columns=columns
    )
