"""What a completion marker vouches for, and how its committed file is checked against it.

A marker records, besides its row count, the committed file's size in bytes and the SHA-256 of its
bytes (hashed from the staged bytes before they were published), the store's entity tag (ETag) for
the object once it was in place, and a digest of its sorted keys. Two levels of checking use them:

- `listing_mismatch`: cheap, from one listing of the prefix (no object is read). The file exists,
  its size is the recorded size and, where the store reports entity tags, its ETag is the one it had
  at commit: any rewrite of an S3 object, even one of the same size, gets a new ETag. Resume uses it.
- `content_mismatch`: the file's bytes hash to the recorded SHA-256 and its rows to the recorded row
  count and key set. `verify` uses it; it reads every file.

SHA-256 rather than the ETag is what the marker stands on: an ETag is an MD5 only for single-part,
unencrypted uploads, and differs between stores, so it says "unchanged since commit" but not "these
bytes". Markers written before these fields existed lack them: they can be checked only by reading
the file (its row count), and `verify` says which ones it could not check fully.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterable, Mapping

# Marker fields added for integrity checks (older markers have none of them).
BYTES = "bytes"
SHA256 = "sha256"
ETAG = "etag"
KEYS_SHA256 = "keys_sha256"


@dataclass(frozen=True)
class Fingerprint:
    """A file's bytes, summarised: what a marker records and what a check recomputes."""

    size: int
    sha256: str

    @classmethod
    def of(cls, data: bytes) -> "Fingerprint":
        return cls(size=len(data), sha256=hashlib.sha256(data).hexdigest())


def keys_digest(keys: Iterable[str]) -> str:
    """SHA-256 of the sorted keys as a JSON list: unambiguous whatever characters a key holds."""
    return hashlib.sha256(json.dumps(sorted(keys), ensure_ascii=False).encode()).hexdigest()


def listed_size(info: Mapping[str, object]) -> int | None:
    size = info.get("size", info.get("Size"))
    return int(size) if isinstance(size, (int, float)) else None


def listed_etag(info: Mapping[str, object]) -> str | None:
    """The entity tag a listing or HEAD reports (S3 `ETag`, GCS `etag`), without its quotes."""
    tag = info.get("ETag", info.get("etag"))
    return tag.strip('"') if isinstance(tag, str) and tag.strip('"') else None


def marker_fields(fingerprint: Fingerprint, etag: str | None, keys: Iterable[str]) -> dict[str, object]:
    """The integrity fields a marker records for its committed file."""
    return {BYTES: fingerprint.size, SHA256: fingerprint.sha256, ETAG: etag, KEYS_SHA256: keys_digest(keys)}


def is_fully_checkable(marker: Mapping[str, object]) -> bool:
    """False for markers written before size and checksum were recorded."""
    return isinstance(marker.get(BYTES), int) and isinstance(marker.get(SHA256), str)


def listing_mismatch(marker: Mapping[str, object], info: Mapping[str, object] | None) -> str | None:
    """Why the listed data file is not the file the marker committed, or None when it may be.

    `info` is the file's listing entry (None: not listed). Fields the marker lacks are not checked.
    """
    if info is None:
        return "its data file is missing"
    recorded_size = marker.get(BYTES)
    size = listed_size(info)
    if isinstance(recorded_size, int) and size is not None and size != recorded_size:
        return f"its data file is {size} bytes, the marker recorded {recorded_size}"
    recorded_etag = marker.get(ETAG)
    etag = listed_etag(info)
    if isinstance(recorded_etag, str) and etag is not None and etag != recorded_etag.strip('"'):
        return f"its data file was replaced after the commit (ETag {etag}, the marker recorded {recorded_etag})"
    return None


def content_mismatch(
    marker: Mapping[str, object], fingerprint: Fingerprint, rows: int, keys: Iterable[str]
) -> list[str]:
    """How the file's bytes and rows differ from what the marker recorded (empty: they match)."""
    problems = []
    recorded_size, recorded_sha = marker.get(BYTES), marker.get(SHA256)
    if isinstance(recorded_size, int) and fingerprint.size != recorded_size:
        problems.append(f"the file is {fingerprint.size} bytes, the marker recorded {recorded_size}")
    if isinstance(recorded_sha, str) and fingerprint.sha256 != recorded_sha:
        problems.append(f"the file's SHA-256 is {fingerprint.sha256[:12]}…, the marker recorded {recorded_sha[:12]}…")
    recorded_rows = marker.get("rows")
    if isinstance(recorded_rows, int) and rows != recorded_rows:
        problems.append(f"the file has {rows} rows, the marker recorded {recorded_rows}")
    recorded_keys = marker.get(KEYS_SHA256)
    if isinstance(recorded_keys, str) and keys_digest(keys) != recorded_keys:
        problems.append("the file's keys are not the key set the marker recorded")
    return problems
