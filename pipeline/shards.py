"""Turning input patterns into a sorted shard list, and each shard into its output name.

An output name is the shard's path relative to the static part of the pattern that matched it
(`s3://b/data/2026-11-01/shard-7.tar` under `s3://b/data/**/*.tar` -> `2026-11-01/shard-7`). It
depends on nothing but the shard and its pattern, so reruns and growing prefixes keep their names.
"""

from __future__ import annotations

import posixpath
import re
from collections import defaultdict
from dataclasses import dataclass

import braceexpand

from pipeline.config import StorageConfig
from pipeline.errors import ConfigError
from pipeline.storage import describe_storage_error, filesystem
from pipeline.urls import protocol_of

_GLOB_CHARS = re.compile(r"[*?\[]")
_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_MAX_LISTED = 5


@dataclass(frozen=True)
class Shard:
    url: str
    name: str
    size: int | None = None


def static_prefix(pattern: str) -> str:
    """The part of a pattern before its first brace or glob, cut back to a directory."""
    cut = len(pattern)
    for marker in ("{", "*", "?", "["):
        index = pattern.find(marker)
        if index != -1:
            cut = min(cut, index)
    head = pattern[:cut]
    return head[: head.rfind("/") + 1] if "/" in head else ""


def output_name(relative_path: str) -> str:
    """Shard path relative to its pattern, minus the tar suffix; never escapes the output prefix."""
    name = relative_path
    for suffix in _TAR_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        raise ValueError(f"cannot derive a safe output name from {relative_path!r}")
    if parts[0].startswith("_"):
        # `_staging`, `_runs` and `_done` are the run's own; readers skip `_` paths, so it would be invisible too
        raise ValueError(f"{relative_path!r} would be written under a `_` directory, which readers skip")
    return "/".join(parts)


def expand_shards(patterns: list[str], storage: StorageConfig) -> list[Shard]:
    """Every shard the patterns name, sorted by URL; ConfigError for anything missing or unreachable."""
    found: dict[str, Shard] = {}
    for pattern in patterns:
        for shard in _expand_one(pattern, storage):
            found.setdefault(shard.url, shard)
    shards = sorted(found.values(), key=lambda s: s.url)
    by_name: dict[str, list[str]] = defaultdict(list)
    for shard in shards:
        by_name[shard.name].append(shard.url)
    clashes = {name: urls for name, urls in by_name.items() if len(urls) > 1}
    if clashes:
        name, urls = next(iter(clashes.items()))
        raise ConfigError(
            f"input.urls: {len(clashes)} output name(s) would be shared by different shards, e.g. {name!r} by "
            f"{', '.join(urls)}. Output files are named after each shard's path under its pattern's directory; "
            "give those shards distinct paths or run them as separate jobs."
        )
    return shards


def _expand_one(pattern: str, storage: StorageConfig) -> list[Shard]:
    fs, _ = filesystem(pattern, storage)
    protocol = protocol_of(pattern)
    try:
        expanded = list(braceexpand.braceexpand(pattern))
    except Exception as exc:  # braceexpand raises its own error types for unbalanced braces
        raise ConfigError(f"input.urls: cannot expand {pattern!r}: {exc}") from None
    literal = [p for p in expanded if not _GLOB_CHARS.search(p)]
    globbed = [p for p in expanded if _GLOB_CHARS.search(p)]
    prefix = static_prefix(pattern)

    shards: list[Shard] = []
    try:
        shards.extend(_check_literals(fs, literal, prefix))
        for glob in globbed:
            matches = fs.glob(fs._strip_protocol(glob), detail=True)
            shards.extend(
                _shard(fs, path, info.get("size"), prefix)
                for path, info in sorted(matches.items())
                if info.get("type", "file") == "file"
            )
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"input.urls: cannot list {pattern!r}: {describe_storage_error(exc, pattern, storage)}"
        ) from None
    if not shards:
        raise ConfigError(
            f"input.urls: no shards match {pattern!r}" + (f" ({protocol}://)" if protocol != "file" else "")
        )
    return shards


def _check_literals(fs, urls: list[str], prefix: str) -> list[Shard]:
    """Check many explicit shard paths with one listing per directory instead of one request per shard."""
    by_dir: dict[str, list[str]] = defaultdict(list)
    for url in urls:
        path = fs._strip_protocol(url)
        by_dir[posixpath.dirname(path)].append(path)
    shards: list[Shard] = []
    missing: list[str] = []
    for directory, paths in by_dir.items():
        try:
            listing = {entry["name"].rstrip("/"): entry for entry in fs.ls(directory, detail=True)}
        except FileNotFoundError:
            listing = {}
        for path in paths:
            entry = listing.get(path.rstrip("/"))
            if entry is None or entry.get("type", "file") != "file":
                missing.append(fs.unstrip_protocol(path))
            else:
                shards.append(_shard(fs, path, entry.get("size"), prefix))
    if missing:
        shown = ", ".join(missing[:_MAX_LISTED]) + (
            f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        )
        raise ConfigError(f"input.urls: {len(missing)} of {len(urls)} shard(s) do not exist: {shown}")
    return shards


def _shard(fs, path: str, size: int | None, prefix: str) -> Shard:
    url = fs.unstrip_protocol(path)
    stripped_prefix = fs._strip_protocol(prefix) if prefix else ""
    if stripped_prefix and not stripped_prefix.endswith("/"):
        stripped_prefix += "/"
    relative = (
        path[len(stripped_prefix) :]
        if stripped_prefix and path.startswith(stripped_prefix)
        else posixpath.basename(path)
    )
    try:
        name = output_name(relative)
    except ValueError as exc:
        raise ConfigError(f"input.urls: {exc}") from None
    return Shard(url=url, name=name, size=int(size) if size is not None else None)
