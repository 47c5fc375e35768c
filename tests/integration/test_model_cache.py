"""A checkpoint on s3:// is fetched into the node cache safely when several actors start at once."""

from __future__ import annotations

import filecmp
import multiprocessing
from pathlib import Path

from support import upload

from pipeline.config import StorageConfig
from pipeline.model_source import ModelSource, local_model_dir
from pipeline.storage import resolve_storage


def _fetch(args: tuple[str, str]) -> str:
    source, cache = args
    model = ModelSource(source=source, revision=None, storage=resolve_storage(StorageConfig()), cache_dir=cache)
    return local_model_dir(model, files="all")


def test_concurrent_fetches_share_one_complete_copy(s3, bucket, tiny_model, tmp_path):
    upload(s3, tiny_model, f"{bucket}/models/tiny")
    source, cache = f"s3://{bucket}/models/tiny", str(tmp_path / "cache")
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        paths = pool.map(_fetch, [(source, cache)] * 8)

    assert len(set(paths)) == 1
    fetched = Path(paths[0])
    assert (fetched / ".complete").exists()
    comparison = filecmp.dircmp(tiny_model, fetched)
    assert comparison.left_only == [] and comparison.diff_files == []
    assert not (set(comparison.right_only) - {".complete"})
    # Nothing half-written is left behind: one entry, its lock, no staging directories.
    leftovers = sorted(p.name for p in (tmp_path / "cache" / "remote").iterdir())
    assert leftovers == sorted([fetched.name, fetched.name + ".lock"])


def test_a_replaced_checkpoint_is_fetched_again(s3, bucket, tiny_model, tmp_path):
    upload(s3, tiny_model, f"{bucket}/models/tiny")
    source, cache = f"s3://{bucket}/models/tiny", str(tmp_path / "cache")
    first = _fetch((source, cache))
    s3.filesystem().pipe(f"{bucket}/models/tiny/generation_config.json", b'{"max_length": 7}')
    second = _fetch((source, cache))
    assert first != second
    assert Path(second, "generation_config.json").read_bytes() == b'{"max_length": 7}'
