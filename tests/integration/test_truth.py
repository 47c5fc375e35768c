"""The bundled shapes model through the whole pipeline: every row must describe its own image.

The model (models/tiny-llava-shapes, trained by pipeline.tools.train_shapes) answers correctly on
these generated scenes, so a caption, tag list or answer that belongs to another image (rows shifted
after padding, answers from another batch, per-sample questions asked of the wrong sample) shows up
as a mismatch with the ground truth in that row's own JSON. The shards mix sizes, aspect ratios and
formats, keys are shuffled within each shard, and the model stage runs two actors at batch sizes 3
(padded chunks of 3 and the shorter ones left at the end of a block) and 16 (a chunk spanning whole blocks).
At batch size 3 a prepare actor pool feeds the model actors; at 16 the model actors prepare their own
batches (`stages.prepare.in_model_actors`): both layouts must give every row its own answers.
"""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import yaml
from support import SHAPES_MODEL, base_job, read_output, upload

from pipeline.cli import main
from pipeline.testing.shards import Scene, shape_presence_questions, synthetic_samples, write_shard
from pipeline.tools.evaluate import JOB_QUESTIONS, mismatches

SIZES = ((64, 64), (96, 64), (48, 80))
FORMATS = ("jpg", "png", "webp")
# Shards of scenes the bundled model gets right (caption, tags, every answer) when run directly, checked
# when it was trained: a mismatch in this test is the pipeline's, not the model's. (Of 39 shards scanned,
# 22 were right in every row; each of the others had 1-4 wrong answers.)
SHARD_SEEDS = (6_000, 6_005, 6_012)
TASKS = {
    "caption": {"max_new_tokens": 16},
    "tags": {"max_new_tokens": 16},
    "vqa": {"questions": JOB_QUESTIONS, "sample_field": "questions", "max_new_tokens": 4},
}


def _shard_samples(index: int) -> list[dict[str, object]]:
    # Shard 2 carries no per-sample questions, so its rows must answer the job's questions only.
    samples = synthetic_samples(
        8,
        seed=SHARD_SEEDS[index],
        key_prefix=f"truth{index}",
        extensions=FORMATS[index:] + FORMATS[:index],
        sizes=SIZES[index:] + SIZES[:index],
        questions=shape_presence_questions if index < 2 else None,
    )
    random.Random(index).shuffle(samples)
    return samples


@pytest.fixture(scope="module")
def truth_bucket(s3, tmp_path_factory: pytest.TempPathFactory) -> str:
    bucket = "truth"
    s3.create_bucket(bucket)
    directory = tmp_path_factory.mktemp("truth-shards")
    for index in range(3):
        path = directory / f"shard-{index:05d}.tar"
        write_shard(path, _shard_samples(index))
        upload(s3, path, f"{bucket}/shards/{path.name}")
    # Uploaded like a real checkpoint, so actors load it from s3:// through the node cache.
    upload(s3, SHAPES_MODEL, f"{bucket}/model")
    return bucket


@pytest.fixture(scope="module", params=[3, 16], ids=lambda size: f"batch{size}")
def truth_run(request, s3, ray_address, truth_bucket, tmp_path_factory):
    batch_size = request.param
    bucket = truth_bucket
    cache = tmp_path_factory.mktemp("model-cache")
    output = f"s3://{bucket}/out-batch{batch_size}/"
    job = base_job(
        bucket,
        f"s3://{bucket}/model",
        output={"url": output},
        model={"cache_dir": str(cache)},
        tasks=TASKS,
        stages={
            "read": {"num_cpus": 0.25, "rows_per_block": 5},
            "prepare": {"concurrency": 1, "num_cpus": 0.5, "batch_size": 4}
            if batch_size == 3
            else {"in_model_actors": True},
            # Half a CPU each: the previous batch size's actors, which hold theirs until their last metrics export
            # (pipeline.metrics.StageMetrics.settle), and this run's fit the session Ray's 4 CPUs side by side.
            "model": {"concurrency": 2, "num_gpus": 0, "num_cpus": 0.5, "batch_size": batch_size},
        },
    )
    job_path = tmp_path_factory.mktemp("truth-jobs") / f"batch{batch_size}.yaml"
    job_path.write_text(yaml.safe_dump(job))
    exit_code = main(["run", str(job_path)])
    return {"exit_code": exit_code, "rows": read_output(s3, output).to_pylist(), "cache": cache}


def test_every_row_describes_its_own_image(truth_run):
    assert truth_run["exit_code"] == 0
    rows = truth_run["rows"]
    keys = Counter(row["key"] for row in rows)
    expected = Counter(sample["__key__"] for index in range(3) for sample in _shard_samples(index))
    assert keys == expected
    assert mismatches(rows) == []


def test_checkpoint_from_s3_is_fetched_once_into_the_node_cache_and_cpu_actors_skip_the_weights(truth_run):
    """The answers above came from the checkpoint fetched from s3://: the model actors' copy is whole, the
    prepare actors' holds the processor files only, and each copy is marked complete."""
    remote = truth_run["cache"] / "remote"
    entries = sorted(p.name for p in remote.iterdir() if p.is_dir())
    assert sorted(e.rsplit("-", 1)[1] for e in entries) == ["all", "processor"]
    for entry in entries:
        assert (remote / entry / ".complete").exists()
    assert list(remote.glob("*-all/*.safetensors")), "the model actors load the fetched weights"
    assert list(remote.glob("*-processor/*.safetensors")) == [], "CPU workers must not fetch the weights"


def test_per_sample_questions_are_asked_of_that_sample_only(truth_run):
    for row in truth_run["rows"]:
        own = json.loads(row["metadata"]).get("questions") or []
        scene = Scene.from_truth(json.loads(row["metadata"]))
        answers = [(qa["question"], qa["answer"]) for qa in row["vqa"]]
        assert answers == [(q, scene.answer(q)) for q in JOB_QUESTIONS + own], row["key"]
        # Each sample asks about its own shape (yes) and another one (no).
        assert sorted(answer for question, answer in answers if question in own) == (["no", "yes"] if own else [])


def _scene(row: dict) -> Scene:
    return Scene.from_truth(json.loads(row["metadata"]))


def test_outputs_moved_to_another_row_are_caught(truth_run):
    """The checks above must fail for a pipeline that hands one image's outputs to another row."""
    rows = sorted(truth_run["rows"], key=lambda row: row["key"])
    shifted_by_one = list(range(-1, len(rows) - 1))
    shuffled = list(range(len(rows)))
    random.Random(0).shuffle(shuffled)
    corruptions = {f"{field} shifted by one row": ((field,), shifted_by_one) for field in ("caption", "tags", "vqa")}
    corruptions["all outputs shuffled"] = (("caption", "tags", "vqa"), shuffled)
    for name, (fields, source) in corruptions.items():
        corrupted = [{**row, **{f: rows[j][f] for f in fields}} for row, j in zip(rows, source)]
        flagged = {line.split(":", 1)[0] for line in mismatches(corrupted)}
        # A row that received the outputs of an identical scene is still right; every other row must be caught.
        moved = {row["key"] for row, j in zip(rows, source) if _scene(rows[j]) != _scene(row)}
        assert len(moved) > len(rows) // 2, name
        assert flagged >= moved, name
