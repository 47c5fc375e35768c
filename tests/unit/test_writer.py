"""Unit tests for pipeline.writer.ShardCommitter on a local temp dir, fed literal model-stage tables."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import rows
from pipeline.config import RetryConfig, StorageConfig
from pipeline.layout import STAGING_DIR, OutputLayout
from pipeline.schema import load_schema, schema_for
from pipeline.shards import Shard
from pipeline.writer import ShardCommitter

SCHEMA = schema_for()  # what a job without embeddings writes (version 2)
CONSTANTS = {"model": "org/tiny-llava", "settings": '{"dtype": "float32"}', "run_id": "run-1"}
NOW = datetime(2026, 11, 1, 3, 0, tzinfo=timezone.utc)

# What the model stage hands the driver: every output column but the constants, plus the internal ones.
MODEL_OUTPUT_SCHEMA = pa.schema(
    [pa.field(f.name, f.type) for f in SCHEMA.arrow if f.name not in CONSTANTS]
    + [
        pa.field(rows.RECORD, pa.string()),
        pa.field(rows.INDEX, pa.int64()),
        pa.field(rows.SHARD_SAMPLES, pa.int64()),
        pa.field(rows.SHARD_STATUS, pa.string()),
        pa.field(rows.SHARD_ERROR, pa.string()),
        pa.field(rows.seconds_column("model"), pa.float64()),
    ]
)


def make_shard(tmp_path: Path, name: str) -> Shard:
    return Shard(url=f"file://{tmp_path}/in/{name}.tar", name=name)


def sample(shard: Shard, index: int, **overrides: Any) -> dict[str, Any]:
    key = f"{shard.name.replace('/', '_')}-{index:03d}"
    values: dict[str, Any] = {
        rows.RECORD: rows.SAMPLE,
        rows.INDEX: index,
        "key": key,
        "shard": shard.url,
        "members": [f"{key}.jpg", f"{key}.json"],
        "image_member": f"{key}.jpg",
        "image_format": "JPEG",
        "image_width": 64,
        "image_height": 48,
        "image_sha256": f"{index:064x}",
        "metadata": f'{{"i": {index}}}',
        "caption": f"caption {index}",
        "tags": ["red", f"t{index}"],
        "vqa": [{"question": "What?", "answer": f"a{index}"}],
        "error": None,
        "error_reason": None,
        "processed_at": NOW,
        rows.seconds_column("model"): 0.5,
    }
    values.update(overrides)
    return values


def shard_end(shard: Shard, samples: int, status: str = rows.SHARD_OK, error: str | None = None) -> dict[str, Any]:
    return {
        rows.RECORD: rows.SHARD_END,
        "shard": shard.url,
        rows.SHARD_SAMPLES: samples,
        rows.SHARD_STATUS: status,
        rows.SHARD_ERROR: error,
        "processed_at": NOW,
    }


def batch(*row_dicts: dict[str, Any]) -> pa.Table:
    return pa.Table.from_pylist(list(row_dicts), schema=MODEL_OUTPUT_SCHEMA)


def layout(tmp_path: Path) -> OutputLayout:
    return OutputLayout(str(tmp_path / "out"), StorageConfig(), RetryConfig())


def committer(tmp_path: Path, shards: list[Shard], **options: Any) -> ShardCommitter:
    return ShardCommitter(
        layout=layout(tmp_path),
        shards=shards,
        schema=SCHEMA,
        constants=dict(CONSTANTS),
        run_id="run-1",
        compression="zstd",
        **options,
    )


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.mark.parametrize("end_first", [True, False], ids=["shard_end_first", "shard_end_last"])
def test_shard_is_written_once_all_rows_arrived_out_of_order(tmp_path: Path, end_first: bool) -> None:
    shard = make_shard(tmp_path, "shard-00000")
    writer = committer(tmp_path, [shard])
    out = tmp_path / "out"
    batches = [
        batch(sample(shard, 3), sample(shard, 0)),
        batch(sample(shard, 4)),
        batch(sample(shard, 2), sample(shard, 1)),
    ]
    end = batch(shard_end(shard, 5))
    feed = [end, *batches] if end_first else [*batches, end]

    for table in feed[:-1]:
        assert writer.add(table) == []
        assert files_under(out) == []
    [done] = writer.add(feed[-1])

    assert done.shard == shard and done.finished and done.status == rows.SHARD_OK
    assert done.output_path == f"{out}/shard-00000.parquet"
    # The completion marker is written last, next to nothing else.
    assert files_under(out) == ["_done/shard-00000.json", "shard-00000.parquet"]
    written = pq.read_table(out / "shard-00000.parquet")
    assert written.column_names == SCHEMA.names
    assert not [c for c in written.column_names if c.startswith("_")]
    assert written.column("key").to_pylist() == [f"shard-00000-{i:03d}" for i in range(5)]
    assert written.column("caption").to_pylist() == [f"caption {i}" for i in range(5)]
    for name, value in CONSTANTS.items():
        assert written.column(name).to_pylist() == [value] * 5
    assert written.column("vqa").to_pylist()[4] == [{"question": "What?", "answer": "a4"}]
    assert written.column("processed_at").to_pylist() == [NOW] * 5
    assert written.schema.metadata[b"llava_pipeline.run_id"] == b"run-1"
    assert written.schema.metadata[b"llava_pipeline.shard"] == shard.url.encode()
    assert written.schema.metadata[b"llava_pipeline.schema_version"] == str(SCHEMA.version).encode()
    assert writer.committed == [done]
    assert writer.unfinished() == []


def test_written_file_has_the_schema_types(tmp_path: Path) -> None:
    shard = make_shard(tmp_path, "s")
    writer = committer(tmp_path, [shard])
    writer.add(batch(sample(shard, 0), shard_end(shard, 1)))
    written = pq.read_table(tmp_path / "out" / "s.parquet")
    assert written.schema.equals(SCHEMA.arrow)


def test_nothing_is_left_under_staging(tmp_path: Path) -> None:
    shard = make_shard(tmp_path, "s")
    writer = committer(tmp_path, [shard])
    writer.add(batch(sample(shard, 0), shard_end(shard, 1)))
    staging = tmp_path / "out" / STAGING_DIR
    assert files_under(staging) == []
    writer.cleanup_staging()
    assert not (staging / "run-1").exists()
    assert files_under(tmp_path / "out") == ["_done/s.json", "s.parquet"]


def test_error_rows_are_written_with_their_reason(tmp_path: Path) -> None:
    shard = make_shard(tmp_path, "s")
    writer = committer(tmp_path, [shard])
    broken = sample(
        shard, 1, caption=None, tags=None, vqa=None, image_format=None, image_width=None, image_height=None,
        error="image member is empty (0 bytes)", error_reason="empty_image",
    )  # fmt: skip
    writer.add(batch(sample(shard, 0), broken, shard_end(shard, 2)))
    written = pq.read_table(tmp_path / "out" / "s.parquet").to_pylist()
    assert [r["error_reason"] for r in written] == [None, "empty_image"]
    assert written[1]["caption"] is None and written[1]["vqa"] is None


def test_rows_of_interleaved_shards_go_to_their_own_files(tmp_path: Path) -> None:
    a, b = make_shard(tmp_path, "a"), make_shard(tmp_path, "b")
    writer = committer(tmp_path, [a, b])
    assert writer.add(batch(sample(b, 1), sample(a, 0), shard_end(a, 2))) == []
    done = writer.add(batch(sample(a, 1), sample(b, 0), shard_end(b, 2)))
    assert sorted(r.shard.name for r in done) == ["a", "b"]
    for shard in (a, b):
        written = pq.read_table(tmp_path / "out" / f"{shard.name}.parquet")
        assert written.column("shard").to_pylist() == [shard.url] * 2
        assert written.column("key").to_pylist() == [f"{shard.name}-000", f"{shard.name}-001"]


def test_failed_shard_writes_no_file_and_is_finished(tmp_path: Path) -> None:
    shard = make_shard(tmp_path, "broken")
    writer = committer(tmp_path, [shard])
    done = writer.add(batch(shard_end(shard, 0, rows.SHARD_FAILED, "ReadError: invalid header")))
    assert done == [writer.results[shard.url]]
    result = done[0]
    assert (result.status, result.error, result.output_path, result.finished) == (
        rows.SHARD_FAILED,
        "ReadError: invalid header",
        None,
        True,
    )
    assert files_under(tmp_path / "out") == []
    assert writer.committed == []
    assert writer.unfinished() == []


def test_partial_shard_writes_the_rows_it_has(tmp_path: Path) -> None:
    shard = make_shard(tmp_path, "cut")
    writer = committer(tmp_path, [shard])
    [done] = writer.add(
        batch(sample(shard, 1), sample(shard, 0), shard_end(shard, 2, rows.SHARD_PARTIAL, "ReadError: x"))
    )
    assert done.status == rows.SHARD_PARTIAL
    assert pq.read_table(tmp_path / "out" / "cut.parquet").column("key").to_pylist() == ["cut-000", "cut-001"]


def test_ok_shard_with_zero_samples_writes_an_empty_file_with_the_schema(tmp_path: Path) -> None:
    shard = make_shard(tmp_path, "empty")
    writer = committer(tmp_path, [shard])
    [done] = writer.add(batch(shard_end(shard, 0)))
    assert done.output_path == f"{tmp_path}/out/empty.parquet"
    written = pq.read_table(tmp_path / "out" / "empty.parquet")
    assert written.num_rows == 0
    assert written.schema.equals(SCHEMA.arrow)
    assert written.schema.metadata[b"llava_pipeline.shard"] == shard.url.encode()


def test_nested_shard_names_create_subdirectories(tmp_path: Path) -> None:
    shard = make_shard(tmp_path, "2026-11-01/part-a/shard-7")
    writer = committer(tmp_path, [shard])
    [done] = writer.add(batch(sample(shard, 0), shard_end(shard, 1)))
    assert done.output_path == f"{tmp_path}/out/2026-11-01/part-a/shard-7.parquet"
    assert files_under(tmp_path / "out") == [
        "2026-11-01/part-a/shard-7.parquet",
        "_done/2026-11-01/part-a/shard-7.json",
    ]
    assert pq.read_table(done.output_path).num_rows == 1


def test_unfinished_lists_shards_still_waiting(tmp_path: Path) -> None:
    a, b, c = (make_shard(tmp_path, n) for n in "abc")
    writer = committer(tmp_path, [a, b, c])
    assert [r.shard.name for r in writer.unfinished()] == ["a", "b", "c"]
    writer.add(batch(sample(a, 0), shard_end(a, 1), sample(b, 0)))
    waiting = writer.unfinished()
    assert [r.shard.name for r in waiting] == ["b", "c"]
    assert (waiting[0].received, waiting[0].expected) == (1, None)
    assert (waiting[1].received, waiting[1].expected) == (0, None)
    writer.add(batch(shard_end(b, 2)))
    assert [(r.shard.name, r.received, r.expected) for r in writer.unfinished()] == [("b", 1, 2), ("c", 0, None)]


def test_a_sample_delivered_twice_is_written_once(tmp_path: Path) -> None:
    # A retried read task or a restarted actor can deliver rows again; the first copy wins.
    shard = make_shard(tmp_path, "dup")
    writer = committer(tmp_path, [shard])
    writer.add(batch(sample(shard, 0), sample(shard, 1, caption="first")))
    [done] = writer.add(batch(sample(shard, 1, caption="second"), shard_end(shard, 2)))
    assert (done.received, done.duplicates) == (2, 1)
    written = pq.read_table(tmp_path / "out" / "dup.parquet")
    assert written.column("caption").to_pylist() == ["caption 0", "first"]


def test_rerun_overwrites_the_same_file(tmp_path: Path) -> None:
    shard = make_shard(tmp_path, "s")
    committer(tmp_path, [shard]).add(batch(sample(shard, 0, caption="old"), shard_end(shard, 1)))
    committer(tmp_path, [shard]).add(batch(sample(shard, 0, caption="new"), shard_end(shard, 1)))
    assert files_under(tmp_path / "out") == ["_done/s.json", "s.parquet"]
    assert pq.read_table(tmp_path / "out" / "s.parquet").column("caption").to_pylist() == ["new"]


@pytest.mark.parametrize(("compression", "codec"), [("zstd", "ZSTD"), ("snappy", "SNAPPY"), ("none", "UNCOMPRESSED")])
def test_compression_codec_is_applied(tmp_path: Path, compression: str, codec: str) -> None:
    shard = make_shard(tmp_path, "s")
    writer = ShardCommitter(
        layout=layout(tmp_path), shards=[shard], schema=SCHEMA,
        constants=dict(CONSTANTS), run_id="run-1", compression=compression,
    )  # fmt: skip
    writer.add(batch(sample(shard, 0), shard_end(shard, 1)))
    assert pq.ParquetFile(tmp_path / "out" / "s.parquet").metadata.row_group(0).column(0).compression == codec


def test_rows_arriving_after_their_shard_was_committed_are_dropped(tmp_path: Path) -> None:
    shard = make_shard(tmp_path, "shard-00000")
    writer = committer(tmp_path, [shard])
    writer.add(batch(sample(shard, 0), shard_end(shard, 1)))
    assert writer.add(batch(sample(shard, 0, caption="late copy"))) == []
    assert writer.duplicates == 1
    written = pq.read_table(tmp_path / "out" / "shard-00000.parquet")
    assert written.column("caption").to_pylist() == ["caption 0"]


def test_marker_records_what_was_committed(tmp_path: Path) -> None:
    shard = make_shard(tmp_path, "s")
    writer = committer(tmp_path, [shard])
    writer.add(batch(sample(shard, 0), sample(shard, 1, error="bad", error_reason="corrupt_image")))
    writer.add(batch(shard_end(shard, 2, rows.SHARD_PARTIAL, "truncated")))
    marker = json.loads((tmp_path / "out" / "_done" / "s.json").read_text())
    assert marker["shard"] == shard.url and marker["output"] == f"{tmp_path}/out/s.parquet"
    assert (marker["status"], marker["error"], marker["rows"], marker["failed_rows"]) == ("partial", "truncated", 2, 1)
    assert marker["run_id"] == "run-1"


def test_patch_replaces_retried_rows_in_place(tmp_path: Path) -> None:
    shard = make_shard(tmp_path, "s")
    first = committer(tmp_path, [shard])
    first.add(
        batch(
            sample(shard, 0),
            sample(shard, 1, caption=None, error="boom", error_reason="generation_failed"),
            sample(shard, 2),
            sample(shard, 3, caption=None, error="oom", error_reason="out_of_memory"),
            shard_end(shard, 4),
        )
    )
    final = str(tmp_path / "out" / "s.parquet")
    retry = ShardCommitter(
        layout=layout(tmp_path), shards=[shard], schema=SCHEMA,
        constants={**CONSTANTS, "run_id": "run-2"}, run_id="run-2", compression="zstd", patch=True,
    )  # fmt: skip
    # The retry reads only the failed samples: indexes 0 and 1 of the retry are samples 1 and 3.
    [done] = retry.add(
        batch(
            sample(shard, 1, key="s-001", caption="fixed 1"),
            sample(shard, 0, key="s-003", caption="fixed 3"),
            shard_end(shard, 2),
        )
    )
    written = pq.read_table(final)
    assert written.column("key").to_pylist() == ["s-000", "s-001", "s-002", "s-003"]
    assert written.column("caption").to_pylist() == ["caption 0", "fixed 1", "caption 2", "fixed 3"]
    assert written.column("error").to_pylist() == [None] * 4
    assert written.column("run_id").to_pylist() == ["run-1", "run-2", "run-1", "run-2"]
    assert done.rows_replaced == 2
    assert json.loads((tmp_path / "out" / "_done" / "s.json").read_text())["rows_replaced"] == 2


def test_commits_on_threads_overlap_the_driver_and_each_shard_commits_once(tmp_path: Path) -> None:
    shards = [make_shard(tmp_path, f"shard-{i:05d}") for i in range(6)]
    writer = committer(tmp_path, shards, commit_threads=4)
    collected = []
    for shard in shards:
        writer.admit(batch(sample(shard, 0), sample(shard, 1), shard_end(shard, 2)))
        collected += writer.commit_ready()
        writer.admit(batch(sample(shard, 1)))  # a late repeat while its commit may be in flight: dropped
    collected += writer.drain()
    writer.close()

    assert sorted(r.shard.name for r in collected) == [s.name for s in shards], "each shard reported once"
    assert writer.unfinished() == [] and writer.duplicates == len(shards)
    for shard in shards:
        assert pq.read_table(tmp_path / "out" / f"{shard.name}.parquet").num_rows == 2


def test_a_commit_that_fails_on_its_thread_fails_the_driver(tmp_path: Path) -> None:
    shard = make_shard(tmp_path, "shard-00000")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "_done").write_text("a file where the markers' folder goes")
    writer = committer(tmp_path, [shard])
    writer.admit(batch(sample(shard, 0), shard_end(shard, 1)))
    with pytest.raises(OSError):  # the marker cannot be written: the error reaches the driver's thread
        writer.commit_ready()  # raises here when the commit thread has failed already, else in drain
        writer.drain()
    writer.close()
    assert writer.unfinished() == [writer.results[shard.url]], "nothing vouches for the shard: the next run redoes it"


def test_patch_upgrades_a_file_an_earlier_schema_version_wrote(tmp_path: Path) -> None:
    """retry-failed over an output written before the token columns: the kept rows get them as nulls."""
    shard = make_shard(tmp_path, "s")
    v1 = load_schema(1)
    old_rows = [
        {**sample(shard, i, error="boom" if i == 1 else None), **CONSTANTS, "run_id": "run-0"} for i in range(3)
    ]
    (tmp_path / "out").mkdir()
    pq.write_table(v1.conform(pa.Table.from_pylist(old_rows)), tmp_path / "out" / "s.parquet")
    retry = ShardCommitter(
        layout=layout(tmp_path), shards=[shard], schema=SCHEMA,
        constants={**CONSTANTS, "run_id": "run-2"}, run_id="run-2", compression="zstd", patch=True,
    )  # fmt: skip
    tokens = [{"task": "caption", "prompt_tokens": 20, "generated_tokens": 3}]
    retry.add(
        batch(
            sample(shard, 0, key="s-001", prompt_tokens=20, generated_tokens=3, task_tokens=tokens),
            shard_end(shard, 1),
        )
    )
    written = pq.read_table(tmp_path / "out" / "s.parquet")
    assert written.schema.metadata[b"llava_pipeline.schema_version"] == str(SCHEMA.version).encode()
    assert written.column_names == SCHEMA.names
    assert written.column("key").to_pylist() == ["s-000", "s-001", "s-002"]
    assert written.column("prompt_tokens").to_pylist() == [None, 20, None]
    assert written.column("task_tokens").to_pylist() == [None, tokens, None]
