"""Model checkpoints: fetched once per node into a local cache, then loaded from that path.

Several actors on a node start at once; a file lock makes one of them download while the others
wait, and a finished download is renamed into place whole, so no actor ever loads a half-written
checkpoint. A cache entry is named by the source and its file listing (size and ETag/mtime), so a
checkpoint replaced at the same URL is fetched again rather than served stale.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from filelock import FileLock

from pipeline.config import EmbedModelConfig, ModelConfig, StorageConfig
from pipeline.errors import ConfigError
from pipeline.storage import describe_storage_error, filesystem
from pipeline.urls import protocol_of

# What a CPU preprocessing worker needs: everything but the weights.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".ckpt")
_COMPLETE = ".complete"
_DEFAULT_CACHE = "~/.cache/llava-pipeline"

Files = Literal["all", "processor"]


@dataclass(frozen=True)
class ModelSource:
    """Where a checkpoint lives and how to reach it; picklable, shipped to every actor."""

    source: str
    revision: str | None
    storage: StorageConfig
    cache_dir: str
    field: str = "model.source"  # the job's field naming it, for errors

    @classmethod
    def from_config(
        cls, config: ModelConfig | EmbedModelConfig, storage: StorageConfig, field: str = "model.source"
    ) -> "ModelSource":
        return cls(
            source=config.source,
            revision=config.revision,
            storage=storage,
            cache_dir=node_cache_dir(config.cache_dir),
            field=field,
        )

    @property
    def kind(self) -> Literal["local", "remote", "hub"]:
        if "://" in self.source:
            return "local" if protocol_of(self.source) == "file" else "remote"
        if self.source.startswith((".", "/", "~")) or Path(self.source).expanduser().exists():
            return "local"
        return "hub"


def node_cache_dir(configured: str | None = None) -> str:
    """This node's cache directory: `configured`, else `$LLAVA_PIPELINE_CACHE`, else `~/.cache/llava-pipeline`."""
    return configured or os.environ.get("LLAVA_PIPELINE_CACHE") or _DEFAULT_CACHE


def is_weight_file(name: str) -> bool:
    """True for the files only a model's forward pass needs (what a processor-files fetch leaves out)."""
    return name.lower().endswith(_WEIGHT_SUFFIXES)


def local_model_dir(model: ModelSource, files: Files = "all") -> str:
    """A local directory holding the checkpoint (or just its processor files), fetching it if needed."""
    if model.kind == "local":
        path = Path(model.source.removeprefix("file://")).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise ConfigError(f"{model.field}: {path} is not a saved checkpoint (no config.json)")
        return str(path)
    if model.kind == "remote":
        return _fetch_remote(model, files)
    return _fetch_hub(model, files)


def _wanted(relative: str, files: Files) -> bool:
    return files == "all" or not is_weight_file(relative)


def _remote_listing(model: ModelSource) -> dict[str, dict[str, object]]:
    try:
        fs, root = filesystem(model.source, model.storage)
        root = root.rstrip("/")
        entries = fs.find(root, detail=True)
    except Exception as exc:
        raise ConfigError(f"{model.field}: {describe_storage_error(exc, model.source, model.storage)}") from None
    listing = {}
    for path, info in entries.items():
        if info.get("type", "file") != "file":
            continue
        relative = path[len(root) :].lstrip("/")
        listing[relative] = {
            "size": info.get("size"),
            "version": str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""),
        }
    if not listing:
        raise ConfigError(f"{model.field}: nothing found under {model.source}")
    if "config.json" not in listing:
        raise ConfigError(f"{model.field}: {model.source} holds no config.json, so it is not a saved checkpoint")
    return listing


def _fetch_remote(model: ModelSource, files: Files) -> str:
    listing = {k: v for k, v in _remote_listing(model).items() if _wanted(k, files)}
    digest = hashlib.sha256(json.dumps([model.source, sorted(listing.items())], sort_keys=True, default=str).encode())
    cache = Path(model.cache_dir).expanduser()
    target = cache / "remote" / f"{digest.hexdigest()[:24]}-{files}"
    if (target / _COMPLETE).exists():
        return str(target)
    cache.joinpath("remote").mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / _COMPLETE).exists():
            return str(target)
        fs, root = filesystem(model.source, model.storage)
        root = root.rstrip("/")
        staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            for relative in sorted(listing):
                destination = staging / relative
                destination.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{root}/{relative}", str(destination))
            (staging / _COMPLETE).write_text(json.dumps({"source": model.source, "files": sorted(listing)}))
            if target.exists():
                shutil.rmtree(target)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return str(target)


def _fetch_hub(model: ModelSource, files: Files) -> str:
    from huggingface_hub import snapshot_download

    ignore = None if files == "all" else [f"*{suffix}" for suffix in _WEIGHT_SUFFIXES]
    try:
        # The hub client keeps its own cache with its own locks; a second actor on the node reuses the files.
        return snapshot_download(
            repo_id=model.source,
            revision=model.revision,
            cache_dir=str(Path(model.cache_dir).expanduser() / "hub"),
            ignore_patterns=ignore,
        )
    except Exception as exc:
        raise ConfigError(
            f"{model.field}: {model.source!r} is not a local directory, and fetching it from the Hugging Face hub "
            f"failed: {type(exc).__name__}: {exc}"
        ) from None
