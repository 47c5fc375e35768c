"""Unit tests for pipeline.stages.read.read_shard, called directly on tars in a temp dir (no Ray)."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from pipeline import rows
from pipeline.config import InputConfig, ReadStageConfig, StorageConfig
from pipeline.shards import Shard
from pipeline.stages.read import ShardReader, read_shard
from pipeline.testing.shards import write_shard


def spec(
    image_extensions: tuple[str, ...] = ("jpg", "jpeg", "png", "webp"),
    metadata_extension: str | None = "json",
    rows_per_block: int = 64,
) -> ShardReader:
    return ShardReader(
        input=InputConfig(
            urls=["unused.tar"], image_extensions=list(image_extensions), metadata_extension=metadata_extension
        ),
        stage=ReadStageConfig(rows_per_block=rows_per_block),
        storage=StorageConfig(),
    )


def shard_at(path: Path) -> Shard:
    return Shard(url=f"file://{path}", name=path.stem)


def read_blocks(path: Path, read_spec: ShardReader | None = None) -> list[pa.Table]:
    return list(read_shard(shard_at(path), read_spec or spec()))


def read_rows(path: Path, read_spec: ShardReader | None = None) -> list[dict[str, Any]]:
    return [r for block in read_blocks(path, read_spec) for r in block.to_pylist()]


def simple_samples(count: int, size: int = 1000) -> list[dict[str, object]]:
    return [{"__key__": f"k{i}", "jpg": bytes([i + 1]) * size, "json": f'{{"i": {i}}}'.encode()} for i in range(count)]


@pytest.fixture
def five_sample_tar(tmp_path: Path) -> Path:
    path = tmp_path / "five.tar"
    write_shard(path, simple_samples(5))
    return path


def member_offsets(path: Path) -> dict[str, tuple[int, int, int]]:
    """Member name -> (header offset, data offset, size)."""
    with tarfile.open(path) as archive:
        return {m.name: (m.offset, m.offset_data, m.size) for m in archive.getmembers()}


# --- complete shards -----------------------------------------------------------------------------


def test_rows_keep_key_shard_members_and_index_in_tar_order(tmp_path: Path) -> None:
    path = tmp_path / "s.tar"
    write_shard(
        path,
        [
            {"__key__": "zeta", "jpg": b"A", "json": b"{}"},
            {"__key__": "alpha", "png": b"B"},
            {"__key__": "mid", "jpg": b"C", "txt": b"t", "json": b"{}"},
        ],
    )
    table_rows = read_rows(path)
    samples = [r for r in table_rows if r[rows.RECORD] == rows.SAMPLE]
    assert [r["key"] for r in samples] == ["zeta", "alpha", "mid"]
    assert [r[rows.INDEX] for r in samples] == [0, 1, 2]
    assert {r["shard"] for r in table_rows} == {f"file://{path}"}
    assert [r["members"] for r in samples] == [
        ["zeta.jpg", "zeta.json"],
        ["alpha.png"],
        ["mid.jpg", "mid.json", "mid.txt"],
    ]
    with tarfile.open(path) as archive:
        assert [m for r in samples for m in r["members"]] == archive.getnames()


def test_blocks_have_the_read_schema(five_sample_tar: Path) -> None:
    blocks = read_blocks(five_sample_tar)
    assert blocks and all(block.schema.equals(rows.READ_SCHEMA) for block in blocks)


def test_final_row_is_shard_end_with_sample_count_and_ok_status(five_sample_tar: Path) -> None:
    table_rows = read_rows(five_sample_tar)
    assert [r[rows.RECORD] for r in table_rows] == [rows.SAMPLE] * 5 + [rows.SHARD_END]
    end = table_rows[-1]
    assert end["shard"] == f"file://{five_sample_tar}"
    assert end[rows.SHARD_SAMPLES] == 5
    assert end[rows.SHARD_STATUS] == rows.SHARD_OK
    assert end[rows.SHARD_ERROR] is None
    assert end["key"] is None and end[rows.INDEX] is None and end["error"] is None
    assert end[rows.seconds_column("read")] >= 0.0
    # Sample rows carry no shard-level fields.
    assert all(r[rows.SHARD_SAMPLES] is None and r[rows.SHARD_STATUS] is None for r in table_rows[:-1])


def test_image_bytes_sha256_and_metadata_text_are_kept(five_sample_tar: Path) -> None:
    samples = read_rows(five_sample_tar)[:-1]
    for i, sample in enumerate(samples):
        image = bytes([i + 1]) * 1000
        assert sample["image_member"] == f"k{i}.jpg"
        assert sample[rows.IMAGE_BYTES] == image
        assert sample["image_sha256"] == hashlib.sha256(image).hexdigest()
        assert sample["metadata"] == f'{{"i": {i}}}'
        assert sample["error"] is None and sample["error_reason"] is None


def test_metadata_is_null_when_absent_or_disabled(tmp_path: Path) -> None:
    path = tmp_path / "s.tar"
    write_shard(path, [{"__key__": "a", "jpg": b"A", "json": b'{"x": 1}'}, {"__key__": "b", "jpg": b"B"}])
    assert [r["metadata"] for r in read_rows(path)[:-1]] == ['{"x": 1}', None]
    assert [r["metadata"] for r in read_rows(path, spec(metadata_extension=None))[:-1]] == [None, None]


def test_image_member_follows_extension_preference_order(tmp_path: Path) -> None:
    path = tmp_path / "s.tar"
    write_shard(path, [{"__key__": "a", "jpg": b"JPEG-BYTES", "png": b"PNG-BYTES"}])
    png_first = read_rows(path, spec(image_extensions=("png", "jpg")))[0]
    assert png_first["image_member"] == "a.png"
    assert png_first[rows.IMAGE_BYTES] == b"PNG-BYTES"
    assert png_first["image_sha256"] == hashlib.sha256(b"PNG-BYTES").hexdigest()
    jpg_first = read_rows(path, spec(image_extensions=("jpg", "png")))[0]
    assert jpg_first["image_member"] == "a.jpg"
    assert jpg_first[rows.IMAGE_BYTES] == b"JPEG-BYTES"
    assert png_first["members"] == jpg_first["members"] == ["a.jpg", "a.png"]


def test_extension_matching_is_case_insensitive_and_keeps_the_member_name(tmp_path: Path) -> None:
    path = tmp_path / "s.tar"
    write_shard(path, [{"__key__": "a", "JPG": b"UPPER", "JSON": b'{"u": 1}'}])
    sample = read_rows(path)[0]
    assert sample["image_member"] == "a.JPG"
    assert sample[rows.IMAGE_BYTES] == b"UPPER"
    assert sample["metadata"] == '{"u": 1}'
    assert sample["error"] is None


def test_sample_without_image_is_a_no_image_error_row(tmp_path: Path) -> None:
    path = tmp_path / "s.tar"
    write_shard(path, [{"__key__": "a", "jpg": b"A"}, {"__key__": "b", "txt": b"only text", "json": b"{}"}])
    table_rows = read_rows(path, spec(image_extensions=("png", "jpg")))
    good, bad, end = table_rows
    assert good["error"] is None
    assert bad["key"] == "b" and bad[rows.INDEX] == 1
    assert bad["error_reason"] == "no_image"
    assert bad["error"] == "no image member (looked for png, jpg; found json, txt)"
    assert bad["image_member"] is None and bad[rows.IMAGE_BYTES] is None and bad["image_sha256"] is None
    assert bad["metadata"] == "{}"
    # An error row still counts as a sample of an ok shard.
    assert (end[rows.SHARD_SAMPLES], end[rows.SHARD_STATUS]) == (2, rows.SHARD_OK)


# The shard_end row rides in the last block, after the last sample, which is held back until the
# stream has ended (a sample is only whole once the next one begins or the tar ends cleanly).
@pytest.mark.parametrize(("rows_per_block", "sizes"), [(2, [2, 2, 2]), (1, [1, 1, 1, 1, 2]), (5, [6]), (64, [6])])
def test_rows_per_block_splits_blocks(five_sample_tar: Path, rows_per_block: int, sizes: list[int]) -> None:
    blocks = read_blocks(five_sample_tar, spec(rows_per_block=rows_per_block))
    assert [b.num_rows for b in blocks] == sizes
    indexes = [r[rows.INDEX] for b in blocks for r in b.to_pylist() if r[rows.RECORD] == rows.SAMPLE]
    assert indexes == [0, 1, 2, 3, 4]
    assert blocks[-1].to_pylist()[-1][rows.RECORD] == rows.SHARD_END


def test_empty_tar_is_an_ok_shard_with_zero_samples(tmp_path: Path) -> None:
    path = tmp_path / "empty.tar"
    write_shard(path, [])
    table_rows = read_rows(path)
    assert len(table_rows) == 1
    assert (table_rows[0][rows.RECORD], table_rows[0][rows.SHARD_SAMPLES], table_rows[0][rows.SHARD_STATUS]) == (
        rows.SHARD_END,
        0,
        rows.SHARD_OK,
    )


# --- broken shards -------------------------------------------------------------------------------


def test_truncated_tar_keeps_samples_before_the_break_and_is_partial(tmp_path: Path, five_sample_tar: Path) -> None:
    offsets = member_offsets(five_sample_tar)
    _, data_start, size = offsets["k2.jpg"]
    cut = data_start + size // 2  # mid-way through the third sample's image
    path = tmp_path / "cut.tar"
    path.write_bytes(five_sample_tar.read_bytes()[:cut])
    table_rows = read_rows(path)
    samples, end = table_rows[:-1], table_rows[-1]
    assert [r["key"] for r in samples] == ["k0", "k1"]
    assert [r["members"] for r in samples] == [["k0.jpg", "k0.json"], ["k1.jpg", "k1.json"]]
    assert all(r["error"] is None for r in samples)
    assert end[rows.RECORD] == rows.SHARD_END
    assert end[rows.SHARD_SAMPLES] == 2
    assert end[rows.SHARD_STATUS] == rows.SHARD_PARTIAL
    assert end[rows.SHARD_ERROR] == "ReadError: unexpected end of data"


def test_tar_truncated_inside_a_member_header_is_partial(tmp_path: Path, five_sample_tar: Path) -> None:
    header_start, _, _ = member_offsets(five_sample_tar)["k2.jpg"]
    path = tmp_path / "cut.tar"
    path.write_bytes(five_sample_tar.read_bytes()[: header_start + 200])
    end = read_rows(path)[-1]
    assert end[rows.SHARD_SAMPLES] == 2
    assert end[rows.SHARD_STATUS] == rows.SHARD_PARTIAL


def test_random_bytes_are_a_failed_shard_with_no_samples(tmp_path: Path) -> None:
    path = tmp_path / "noise.tar"
    path.write_bytes(random.Random(7).randbytes(4096))
    table_rows = read_rows(path)
    assert len(table_rows) == 1
    end = table_rows[0]
    assert end[rows.RECORD] == rows.SHARD_END
    assert end[rows.SHARD_SAMPLES] == 0
    assert end[rows.SHARD_STATUS] == rows.SHARD_FAILED
    assert end[rows.SHARD_ERROR].startswith("ReadError: ")


def test_missing_file_is_a_failed_shard_saying_not_found(tmp_path: Path) -> None:
    path = tmp_path / "absent.tar"
    assert not os.path.exists(path)
    table_rows = read_rows(path)
    assert len(table_rows) == 1
    end = table_rows[0]
    assert (end[rows.RECORD], end[rows.SHARD_SAMPLES], end[rows.SHARD_STATUS]) == (rows.SHARD_END, 0, rows.SHARD_FAILED)
    assert end[rows.SHARD_ERROR] == f"file://{path}: not found"


def test_dotted_file_names_match_on_their_last_extension(tmp_path: Path) -> None:
    """`photo.v2.jpg` has the WebDataset suffix `v2.jpg`; it is still the sample's jpg, as webdataset decodes it."""
    path = tmp_path / "dotted.tar"
    write_shard(path, [{"__key__": "photo", "v2.jpg": b"JPEG", "meta.json": b'{"q": 1}', "thumb.png": b"PNG"}])
    [row] = read_rows(path)[:-1]
    assert row["image_member"] == "photo.v2.jpg"
    assert row["metadata"] == '{"q": 1}'
    assert row["error"] is None


def test_exact_suffix_beats_a_last_component_match(tmp_path: Path) -> None:
    path = tmp_path / "exact.tar"
    write_shard(path, [{"__key__": "k", "mask.jpg": b"MASK", "jpg": b"PHOTO"}])
    [row] = read_rows(path)[:-1]
    assert row["image_member"] == "k.jpg"


def test_a_read_worker_reads_a_shard_without_loading_torch(five_sample_tar: Path) -> None:
    """webdataset imports torch when it is installed; a read worker has no use for it (1-2 s of CPU and about
    240 MB per worker), so the read stage imports webdataset with torch marked absent. Checked in a fresh
    interpreter, as a Ray worker starts: the shard reads whole, torch stays unloaded, and stays importable."""
    program = (
        "import sys\n"
        "from pipeline.config import InputConfig, ReadStageConfig, StorageConfig\n"
        "from pipeline.shards import Shard\n"
        "from pipeline.stages.read import ShardReader, read_shard\n"
        "reader = ShardReader(input=InputConfig(urls=['unused.tar']), stage=ReadStageConfig(), storage=StorageConfig())\n"
        f"blocks = list(read_shard(Shard(url='file://{five_sample_tar}', name='s'), reader))\n"
        "print(sum(b.num_rows for b in blocks), blocks[-1].column('_shard_status')[-1].as_py())\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
        "import importlib.util\n"
        "print(importlib.util.find_spec('torch') is not None)\n"  # None while torch is marked absent
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["6 ok", "[]", "True"]
