"""Bad input never stops a job and never disappears: odd images are captioned, broken ones are
error rows, a broken shard is reported and the other shards complete."""

from __future__ import annotations

import io
import json
import os

import pytest
from support import base_job, read_output

from pipeline.cli import main
from pipeline.testing.images import TRICKY_IMAGES
from pipeline.testing.shards import synthetic_samples, write_shard

EXTENSION = {
    "jpeg": "jpg",
    "jpg": "jpg",
    "png": "png",
    "tiff": "tif",
    "webp": "webp",
    "gif": "gif",
    "bomb": "png",
    "text": "jpg",
    "zero": "jpg",
}
EXPECTED_REASON = {
    "truncated_jpeg": "corrupt_image",
    "broken_png": "corrupt_image",
    "zero_bytes": "empty_image",
    "text_as_jpg": "unrecognized_image",
    "decompression_bomb": "too_many_pixels",
}


def _extension(case: str) -> str:
    for hint, extension in EXTENSION.items():
        if hint in case:
            return extension
    return "png"


def _tar_bytes(samples) -> bytes:
    buffer = io.BytesIO()
    write_shard(buffer, samples)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bad_input_run(s3, ray_address, tiny_model, tmp_path_factory):
    bucket = "bad-input"
    s3.create_bucket(bucket)
    fs = s3.filesystem()

    tricky = [{"__key__": f"case-{name}", _extension(name): make()} for name, (make, _) in TRICKY_IMAGES.items()]
    tricky.append({"__key__": "case-no-image", "txt": b"a caption without its picture", "json": b"{}"})
    fs.pipe(f"{bucket}/shards/shard-tricky.tar", _tar_bytes(tricky))

    good = synthetic_samples(6, seed=7, key_prefix="good")
    fs.pipe(f"{bucket}/shards/shard-good.tar", _tar_bytes(good))

    whole = _tar_bytes(synthetic_samples(8, seed=8, key_prefix="cut", sizes=((96, 96),)))
    fs.pipe(f"{bucket}/shards/shard-truncated.tar", whole[: int(len(whole) * 0.6)])

    fs.pipe(f"{bucket}/shards/shard-not-a-tar.tar", os.urandom(5000))

    job = base_job(
        bucket,
        tiny_model,
        tasks={"caption": {"max_new_tokens": 3}, "tags": {"max_new_tokens": 3}},
        decode={"max_image_pixels": 64_000_000},
    )
    job_path = tmp_path_factory.mktemp("jobs") / "job.yaml"
    import yaml

    job_path.write_text(yaml.safe_dump(job))
    exit_code = main(["run", str(job_path)])
    summary_path = fs.glob(f"{bucket}/out/_runs/*.json")[0]
    return {
        "bucket": bucket,
        "exit_code": exit_code,
        "table": read_output(s3, f"s3://{bucket}/out/"),
        "summary": json.loads(fs.cat_file(summary_path)),
        "cut_keys": [s["__key__"] for s in synthetic_samples(8, seed=8, key_prefix="cut", sizes=((96, 96),))],
    }


def test_job_goes_on_past_bad_input_and_exits_1_naming_the_breached_limits(bad_input_run):
    # Every shard was processed (the tests below check each row); the default limits (no broken
    # shard, at most 5% failed samples) are what turn the finished run into exit code 1.
    assert bad_input_run["exit_code"] == 1
    summary = bad_input_run["summary"]
    assert summary["status"] == "failed"
    assert "2 shard(s) failed or ended early, more than failures.max_failed_shards=0" in summary["error"]
    assert "more than failures.max_failed_sample_fraction=0.05" in summary["error"]
    assert summary["shards"]["unfinished"] == 0


@pytest.mark.parametrize("case", sorted(TRICKY_IMAGES))
def test_each_tricky_image_is_captioned_or_an_error_row(bad_input_run, case):
    rows = {r["key"]: r for r in bad_input_run["table"].to_pylist() if r["shard"].endswith("shard-tricky.tar")}
    row = rows[f"case-{case}"]
    should_decode = TRICKY_IMAGES[case][1]
    if should_decode:
        assert row["error"] is None, row["error"]
        assert isinstance(row["caption"], str)
        assert isinstance(row["tags"], list)
        assert row["image_width"] > 0
    else:
        assert row["error_reason"] == EXPECTED_REASON[case]
        assert row["error"]
        assert row["caption"] is None and row["tags"] is None


def test_sample_without_an_image_is_an_error_row_listing_its_members(bad_input_run):
    rows = {r["key"]: r for r in bad_input_run["table"].to_pylist()}
    row = rows["case-no-image"]
    assert row["error_reason"] == "no_image"
    assert "txt" in row["error"] and "json" in row["error"]
    assert row["image_member"] is None and row["caption"] is None
    assert sorted(row["members"]) == ["case-no-image.json", "case-no-image.txt"]


def test_truncated_shard_keeps_the_samples_before_the_break(bad_input_run):
    table = bad_input_run["table"]
    kept = [r["key"] for r in table.to_pylist() if r["shard"].endswith("shard-truncated.tar")]
    assert 0 < len(kept) < 8
    assert kept == bad_input_run["cut_keys"][: len(kept)]
    problems = {p["shard"].rsplit("/", 1)[1]: p for p in bad_input_run["summary"]["shards"]["problems"]}
    assert problems["shard-truncated.tar"]["status"] == "partial"
    assert problems["shard-truncated.tar"]["samples"] == len(kept)
    assert problems["shard-truncated.tar"]["error"]


def test_non_tar_shard_is_reported_failed_and_others_complete(s3, bad_input_run):
    summary = bad_input_run["summary"]
    problems = {p["shard"].rsplit("/", 1)[1]: p for p in summary["shards"]["problems"]}
    assert problems["shard-not-a-tar.tar"]["status"] == "failed"
    assert summary["shards"] | {"problems": None, "outputs": None} == {
        "total": 4,
        "ok": 2,
        "partial": 1,
        "failed": 1,
        "unfinished": 0,
        "skipped_already_committed": 0,
        "problems": None,
        "outputs": None,
        "rows_replaced": 0,
    }
    files = sorted(
        p.rsplit("/", 1)[1] for p in s3.filesystem().find(f"{bad_input_run['bucket']}/out/") if p.endswith(".parquet")
    )
    assert files == ["shard-good.parquet", "shard-tricky.parquet", "shard-truncated.parquet"]
    good = [r for r in bad_input_run["table"].to_pylist() if r["shard"].endswith("shard-good.tar")]
    assert len(good) == 6 and all(r["error"] is None for r in good)


def test_summary_counts_failures_by_reason(bad_input_run):
    samples = bad_input_run["summary"]["samples"]
    table = bad_input_run["table"]
    expected = {}
    for reason in EXPECTED_REASON.values():
        expected[reason] = expected.get(reason, 0) + 1
    expected["no_image"] = 1
    assert samples["failed_by_reason"] == dict(sorted(expected.items()))
    assert samples["read"] == table.num_rows
    assert samples["failed"] == sum(expected.values())
    stages = bad_input_run["summary"]["stages"]
    assert stages["read"]["errors_by_reason"] == {"no_image": 1}
    assert sum(stages["prepare"]["errors_by_reason"].values()) == len(EXPECTED_REASON)
