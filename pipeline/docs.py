"""Reference docs generated from the code that enforces them: job fields, output columns, reason codes.

`python -m pipeline.docs` rewrites the generated sections of README.md; a test fails when they are
stale, so the README cannot drift from the config models or the schema file.
"""

from __future__ import annotations

import json
import re
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel, SecretStr

from pipeline import rows
from pipeline.config import JobConfig, nested_model
from pipeline.schema import load_schema

MARKERS = {
    "config": ("<!-- BEGIN GENERATED: job config -->", "<!-- END GENERATED: job config -->"),
    "schema": ("<!-- BEGIN GENERATED: output schema -->", "<!-- END GENERATED: output schema -->"),
    "reasons": ("<!-- BEGIN GENERATED: error reasons -->", "<!-- END GENERATED: error reasons -->"),
}


def _type_name(annotation: object) -> str:
    """A reader's name for a field type: `str or null`, `list of str`, `one of `a`, `b``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        if names == ["int", "[min, max]"]:
            names = ["int or [min, max]"]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"map of {_type_name(args[0])} to {_type_name(args[1])}"
    if origin is tuple:
        return "[min, max]"
    if annotation is SecretStr:
        return "secret string"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.is_required():
        return "**required**"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "see below"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{json.dumps(value)}`"


def config_markdown() -> str:
    lines = ["| field | type | default | description |", "| --- | --- | --- | --- |"]
    seen_storage = False

    def walk(model: type[BaseModel], prefix: str) -> None:
        nonlocal seen_storage
        for name, field in model.model_fields.items():
            path = f"{prefix}{name}"
            nested = nested_model(field.annotation)
            if nested is not None and nested.__name__ == "StorageConfig" and prefix:
                lines.append(f"| `{path}` | storage | `null` | {field.description} Same fields as `storage`. |")
                continue
            type_name = "section" if nested else _type_name(field.annotation).replace("|", "\\|")
            description = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{path}` | {type_name} | {_default(field)} | {description} |")
            if nested is not None:
                walk(nested, f"{path}.")

    walk(JobConfig, "")
    return "\n".join(lines)


def schema_markdown() -> str:
    schema = load_schema()
    lines = [
        f"Schema `{schema.name}` version {schema.version} (`schemas/enrichment_v{schema.version}.json`). {schema.description}",
        "",
        "| column | type | nullable | description |",
        "| --- | --- | --- | --- |",
    ]
    for column in schema.columns:
        lines.append(
            f"| `{column.name}` | `{column.type}` | {'yes' if column.nullable else 'no'} | {column.description} |"
        )
    return "\n".join(lines)


def reasons_markdown() -> str:
    lines = ["| `error_reason` | set by | meaning |", "| --- | --- | --- |"]
    for code, (stage, text) in rows.REASONS.items():
        lines.append(f"| `{code}` | {stage} | {text} |")
    return "\n".join(lines)


GENERATORS = {"config": config_markdown, "schema": schema_markdown, "reasons": reasons_markdown}


def render_readme(text: str) -> str:
    for key, (begin, end) in MARKERS.items():
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
        if not pattern.search(text):
            raise ValueError(f"README has no {begin} ... {end} section")
        section = f"{begin}\n{GENERATORS[key]()}\n{end}"
        text = pattern.sub(lambda _, section=section: section, text)  # a function keeps backslashes literal
    return text


def main(argv: list[str] | None = None) -> int:
    path = Path(argv[0] if argv else "README.md")
    text = path.read_text(encoding="utf-8")
    updated = render_readme(text)
    if updated != text:
        path.write_text(updated, encoding="utf-8")
        print(f"updated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
