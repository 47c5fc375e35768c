"""Shards in the local S3 server -> `llava-pipeline run` -> Parquet read back, key by key."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from support import PREPARE_POOL, assert_exactly_once, base_job, read_output, upload

from pipeline.cli import main
from pipeline.schema import load_schema
from pipeline.testing.shards import write_shards

JOB_QUESTION = "What colour is the background?"
SAMPLE_QUESTION = "Is there a star?"


@pytest.fixture(scope="module")
def shard_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    # Odd shards carry per-sample questions, even ones do not; formats and sizes vary within a shard.
    directory = tmp_path_factory.mktemp("shards")
    paths = write_shards(
        directory / "with-q",
        shards=2,
        samples_per_shard=7,
        seed=1,
        questions=[SAMPLE_QUESTION],
        extensions=("jpg", "png", "webp"),
        sizes=((64, 64), (40, 90), (100, 30)),
    )
    paths += write_shards(
        directory / "without-q",
        shards=1,
        samples_per_shard=5,
        seed=2,
        extensions=("png", "jpg"),
        sizes=((32, 32),),
        name="shard-{:05d}-b.tar",
    )
    return paths


ALL_TASKS = {
    "caption": {"max_new_tokens": 4},
    "tags": {"max_new_tokens": 6},
    "vqa": {"questions": [JOB_QUESTION], "sample_field": "questions", "max_new_tokens": 3},
}


@pytest.fixture(scope="module")
def local_model_run(s3, ray_address, tiny_model, shard_files, tmp_path_factory):
    """One run with the model from a saved directory; several tests inspect its outputs.

    Invoked as a nightly job is: a checked-in spec, with tonight's input, output and model on the command line."""
    bucket = "e2e-local-model"
    s3.create_bucket(bucket)
    for path in shard_files:
        upload(s3, path, f"{bucket}/shards/{path.name}")
    spec = base_job("placeholder-bucket", "placeholder-model", tasks=ALL_TASKS, stages={"prepare": PREPARE_POOL})
    job_path = tmp_path_factory.mktemp("jobs") / "job.yaml"
    job_path.write_text(yaml.safe_dump(spec))
    exit_code = main(
        [
            "run",
            str(job_path),
            "--input",
            f"s3://{bucket}/shards/shard-*.tar",
            "--output",
            f"s3://{bucket}/out/",
            "--model",
            str(tiny_model),
        ]
    )
    return {
        "bucket": bucket,
        "model": str(tiny_model),
        "exit_code": exit_code,
        "table": read_output(s3, f"s3://{bucket}/out/"),
    }


def test_run_completes_with_every_key_exactly_once(local_model_run, shard_files):
    assert local_model_run["exit_code"] == 0
    table = local_model_run["table"]
    assert_exactly_once(table, shard_files)
    shards = {f"s3://{local_model_run['bucket']}/shards/{path.name}" for path in shard_files}
    assert set(table.column("shard").to_pylist()) == shards
    assert table.column("error").null_count == table.num_rows


def test_all_three_tasks_produce_their_columns(local_model_run):
    rows = local_model_run["table"].to_pylist()
    for row in rows:
        assert isinstance(row["caption"], str)
        assert isinstance(row["tags"], list)
        questions = [qa["question"] for qa in row["vqa"]]
        has_own = SAMPLE_QUESTION in (json.loads(row["metadata"]).get("questions") or [])
        assert questions == ([JOB_QUESTION, SAMPLE_QUESTION] if has_own else [JOB_QUESTION])
        assert all(isinstance(qa["answer"], str) for qa in row["vqa"])


def test_rows_describe_their_images(local_model_run):
    for row in local_model_run["table"].to_pylist():
        truth_format = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[row["image_member"].rsplit(".", 1)[1]]
        assert row["image_format"] == truth_format
        assert row["image_width"] > 0 and row["image_height"] > 0
        assert len(row["image_sha256"]) == 64
        assert sorted(row["members"]) == sorted([row["image_member"], f"{row['key']}.json"])
        assert row["run_id"] and row["processed_at"] is not None
        assert row["model"] == local_model_run["model"]  # the command line's, not the spec's
        settings = json.loads(row["settings"])
        assert settings["tasks"]["vqa"]["questions"] == [JOB_QUESTION]


def test_outputs_are_one_file_per_shard_with_the_versioned_schema(s3, local_model_run, shard_files):
    fs = s3.filesystem()
    bucket = local_model_run["bucket"]
    files = sorted(p.rsplit("/", 1)[1] for p in fs.find(f"{bucket}/out/") if p.endswith(".parquet"))
    assert files == sorted(p.name.replace(".tar", ".parquet") for p in shard_files)
    assert not fs.exists(f"{bucket}/out/_staging") or not fs.find(f"{bucket}/out/_staging")
    with fs.open(f"{bucket}/out/{files[0]}", "rb") as handle:
        schema = pq.read_schema(handle)
    expected = load_schema(2).arrow  # a job without `embed` writes version 2 (version 3 adds the embeddings)
    assert schema.names == expected.names
    for name in expected.names:
        assert schema.field(name).type == expected.field(name).type
        assert schema.field(name).nullable == expected.field(name).nullable
    assert schema.metadata[b"llava_pipeline.schema_version"] == b"2"
    assert b"llava_pipeline.embeddings" not in schema.metadata


def test_run_summary_is_written_next_to_the_outputs(s3, local_model_run):
    fs = s3.filesystem()
    bucket = local_model_run["bucket"]
    summaries = fs.glob(f"{bucket}/out/_runs/*.json")
    assert len(summaries) == 1
    summary = json.loads(fs.cat_file(summaries[0]))
    table = local_model_run["table"]
    assert summary["status"] == "completed"
    assert summary["samples"] == {
        "read": table.num_rows,
        "succeeded": table.num_rows,
        "failed": 0,
        "failed_by_reason": {},
    }
    assert summary["shards"]["total"] == 3 and summary["shards"]["ok"] == 3
    assert summary["run_id"] == table.column("run_id")[0].as_py()
    assert summary["images_per_second"] > 0
    assert list(summary["stages"]) == ["read", "prepare", "model", "parse"]
    assert summary["stages"]["model"]["busy_seconds"] > 0
    # one check (the prompts through the chat template), run now or passed by an earlier run of the session
    assert sum(summary["processor_checks"].values()) == 1


def test_each_block_reaches_the_driver_before_the_next_one_exists(ray_address, tmp_path):
    """The driver admits (and can commit) a shard's rows as soon as their block exists: the second block's task
    waits until the driver has seen the first, which Ray Data's default prefetching of one block would never
    let happen."""
    import ray.data

    from pipeline.runner import blocks_as_they_come

    seen = tmp_path / "first-block-seen"

    def second_waits_for_the_driver(table):
        if table["id"][0].as_py() == 1:
            deadline = time.monotonic() + 20
            while not seen.exists():
                if time.monotonic() > deadline:
                    raise TimeoutError("the driver had not received the first block 20 s after it was produced")
                time.sleep(0.05)
        return table

    dataset = ray.data.range(2, override_num_blocks=2).map_batches(
        second_waits_for_the_driver, batch_format="pyarrow", batch_size=None
    )
    received = []
    for block in blocks_as_they_come(dataset):
        received.extend(block["id"].to_pylist())
        seen.touch()
    assert sorted(received) == [0, 1]
