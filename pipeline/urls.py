"""URL checks that need no storage connection: which fsspec backend serves a URL, and whether it can.

The job config validates its URLs here; `pipeline.storage` builds filesystems from them. Kept apart
so the config models import no storage code and storage code can import the config models.
"""

from __future__ import annotations

import fsspec
from fsspec.core import split_protocol

_READ_ONLY_PROTOCOLS = ("http", "https")


def protocol_of(url: str) -> str:
    protocol, _ = split_protocol(url)
    return protocol or "file"


def check_url(url: str, *, writable: bool = False) -> str:
    """Reject URLs no installed fsspec backend can serve, naming the package that would."""
    if not url or not url.strip():
        raise ValueError("URL is empty")
    protocol = protocol_of(url)
    if writable and protocol in _READ_ONLY_PROTOCOLS:
        raise ValueError(f"{protocol}:// is read-only; outputs need a writable store such as s3:// or a local path")
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        known = ", ".join(sorted(p for p in _COMMON_PROTOCOLS if _importable(p)))
        raise ValueError(
            f"unsupported URL scheme {protocol!r} in {url!r} (supported: {known}, or a local path)"
        ) from None
    except ImportError as exc:
        raise ValueError(f"URL scheme {protocol!r} needs a package that is not installed: {exc}") from None
    return url


_COMMON_PROTOCOLS = {"file", "s3", "s3a", "gs", "gcs", "abfs", "az", "http", "https", "hf", "memory"}


def _importable(protocol: str) -> bool:
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError):
        return False
    return True
