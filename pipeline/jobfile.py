"""Reading a job spec: YAML into `pipeline.config.JobConfig`, the CLI's overrides applied first, and
validation errors explained one line per field, named by its dotted path."""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Mapping

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.config import JobConfig, nested_model
from pipeline.errors import ConfigError

# Fields whose rejected values must never be echoed back: they may hold credentials.
_SECRET_FIELDS = frozenset({"access_key_id", "secret_access_key", "session_token", "options"})


def _is_mapping(annotation: object) -> bool:
    return any(typing.get_origin(a) is dict for a in (annotation, *typing.get_args(annotation)))


def _field_location(loc: tuple[str | int, ...]) -> tuple[tuple[str | int, ...], type[BaseModel]]:
    """The user's path to a field, without the tags pydantic adds for union members and validators,
    and the model that holds its last key (for listing the allowed keys)."""
    model: type[BaseModel] | None = JobConfig
    holder: type[BaseModel] = JobConfig
    path: list[str | int] = []
    mapping_key_next = False
    for part in loc:
        if isinstance(part, int) or mapping_key_next:
            path.append(part)
            mapping_key_next = False
            continue
        if model is None:
            continue  # a tag such as 'str' or 'function-after[...]' under a non-model field
        holder = model
        path.append(part)
        if part in model.model_fields:
            annotation = model.model_fields[part].annotation
            model = nested_model(annotation)
            mapping_key_next = _is_mapping(annotation)
        else:
            model = None  # a key the user wrote that this level does not have
    return tuple(path), holder


def _format_location(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def describe_validation_error(error: ValidationError, source: str) -> str:
    """One line per bad field, named by its dotted path; union members' complaints merged into one."""
    problems: dict[str, list[str]] = {}
    for item in error.errors():
        loc, holder = _field_location(tuple(item["loc"]))
        where = _format_location(loc)
        if item["type"] == "extra_forbidden":
            message = f"unknown field (allowed here: {', '.join(holder.model_fields)})"
        elif item["type"] == "missing":
            message = "required field is missing"
        else:
            message = item["msg"].removeprefix("Value error, ")
            shown = item.get("input")
            secret = any(part in _SECRET_FIELDS for part in loc)
            if shown is not None and not isinstance(shown, (dict, list)) and not secret:
                message += f" (got {str(shown)[:80]!r})"
        messages = problems.setdefault(where, [])
        if message not in messages:
            messages.append(message)
    lines = [f"{source}: invalid job spec"]
    for where, messages in problems.items():
        lines.append(f"  {where}: {_merge_messages(messages)}")
    return "\n".join(lines)


def _merge_messages(messages: list[str]) -> str:
    prefix = "Input should be a valid "
    if len(messages) > 1 and all(m.startswith(prefix) for m in messages):
        kinds = [m.removeprefix(prefix) for m in messages]
        return f"{prefix}{', '.join(kinds[:-1])} or {kinds[-1]}"
    return "; ".join(messages)


def parse_job(raw: object, *, source: str = "job") -> JobConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: a job spec is a YAML mapping at the top level, got {type(raw).__name__}")
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source)) from None


def load_job(
    path: str | os.PathLike[str],
    *,
    inputs: list[str] | None = None,
    output: str | None = None,
    model: str | None = None,
) -> JobConfig:
    """Read a job spec and apply the CLI's nightly overrides before validating, so errors name the same fields."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read job spec {path}: {exc.strerror or exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if isinstance(raw, dict):
        raw = _with_overrides(raw, inputs=inputs, output=output, model=model)
    return parse_job(raw, source=str(path))


def _with_overrides(
    raw: dict[str, object], *, inputs: list[str] | None, output: str | None, model: str | None
) -> dict[str, object]:
    raw = dict(raw)

    def section(name: str) -> dict[str, object]:
        value = raw.get(name)
        copy = dict(value) if isinstance(value, dict) else {}
        raw[name] = copy
        return copy

    if inputs:
        section("input")["urls"] = list(inputs)
    if output:
        section("output")["url"] = output
    if model:
        section("model")["source"] = model
    return raw
