"""What each task asks of an image, and how answers become output values.

Pure functions over plain data, so the rules for tags and per-sample questions are tested on
literal inputs without a model.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass

from pipeline.config import TasksConfig

CAPTION = "caption"
TAGS = "tags"
VQA = "vqa"
TASK_ORDER = (CAPTION, TAGS, VQA)


@dataclass(frozen=True)
class Prompt:
    task: str
    instruction: str
    question: str | None = None


class MetadataError(ValueError):
    """The sample's metadata cannot supply its questions."""


def sample_questions(metadata: str | None, field: str | None) -> list[str]:
    """Questions a sample asks of itself: a string or a list of strings under `field` in its JSON."""
    if field is None or metadata is None:
        return []
    try:
        document = json.loads(metadata)
    except json.JSONDecodeError as exc:
        raise MetadataError(f"metadata is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(document, dict):
        raise MetadataError(f"metadata is a JSON {type(document).__name__}, not an object")
    value = document.get(field)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(q, str) for q in value):
        raise MetadataError(f"metadata field {field!r} must be a string or a list of strings")
    return [q.strip() for q in value if q.strip()]


def prompts_for(tasks: TasksConfig, questions: list[str]) -> list[Prompt]:
    """Every prompt one image needs, in a fixed order: caption, tags, then each question."""
    prompts: list[Prompt] = []
    if tasks.caption is not None:
        prompts.append(Prompt(CAPTION, tasks.caption.prompt))
    if tasks.tags is not None:
        prompts.append(Prompt(TAGS, tasks.tags.prompt))
    if tasks.vqa is not None:
        for question in questions:
            prompts.append(Prompt(VQA, tasks.vqa.prompt.replace("{question}", question), question))
    return prompts


_TAG_SEPARATORS = re.compile(r"[,;\n\r\t]+|\s+-\s+|(?:^|\s)\d+[.)]\s+|\u2022")
_LIST_MARKER = re.compile(r"^\s*(?:\d+[.)]|[-*\u2022])\s+")
_EDGE_PUNCTUATION = " \t\"'`*.:!?()[]{}<>#-_"


def normalize_tag(text: str) -> str:
    """Lower case, single spaces, no list numbering or edge punctuation: `2. Red Car!` -> `red car`."""
    tag = _LIST_MARKER.sub("", unicodedata.normalize("NFKC", text)).lower().strip(_EDGE_PUNCTUATION)
    return re.sub(r"\s+", " ", tag)


def parse_tags(text: str, *, max_tags: int, vocabulary: frozenset[str] | None = None) -> list[str]:
    """Split a model's tag answer into normalized, de-duplicated tags in the model's order."""
    tags: list[str] = []
    seen: set[str] = set()
    for piece in _TAG_SEPARATORS.split(text):
        tag = normalize_tag(piece)
        if not tag or tag in seen:
            continue
        if vocabulary is not None and tag not in vocabulary:
            continue
        seen.add(tag)
        tags.append(tag)
        if len(tags) == max_tags:
            break
    return tags


def parse_vocabulary(text: str) -> frozenset[str]:
    """One tag per line; blank lines and `#` comments ignored; entries normalized like model output."""
    entries = (normalize_tag(line.split("#", 1)[0]) for line in text.splitlines())
    return frozenset(e for e in entries if e)
