"""The README's first command: the demo job end to end on this machine, nothing downloaded.

It starts an S3-compatible server on 127.0.0.1, uploads generated shards (with a few broken
images, to show error rows) and the bundled tiny LLaVA trained on such shapes
(models/tiny-llava-shapes, see pipeline.tools.train_shapes), runs jobs/demo.yaml from s3:// to
s3://, and prints the summary, some output rows read back from the bucket, and how many rows match
the ground truth their own samples carry.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import pyarrow.dataset as ds

from pipeline.errors import PipelineError
from pipeline.jobfile import load_job
from pipeline.runner import run_job
from pipeline.testing import images as tricky
from pipeline.testing.s3_server import local_s3
from pipeline.testing.shards import shape_presence_questions, synthetic_samples, write_shard
from pipeline.tools.evaluate import row_checks

REPO = Path(__file__).resolve().parents[2]
DEMO_JOB = REPO / "jobs" / "demo.yaml"
DEMO_MODEL = REPO / "models" / "tiny-llava-shapes"
BUCKET = "demo"
WORKDIR = REPO / ".cache" / "demo"


DESCRIPTION = (
    "Start an S3-compatible server on 127.0.0.1, upload generated shards and a tiny LLaVA "
    "checkpoint, run jobs/demo.yaml from s3:// to s3://, and print the summary and some rows."
)


def add_arguments(demo: argparse.ArgumentParser) -> None:
    """`llava-pipeline demo`'s options; `pipeline.cli` calls this only when the chosen command is `demo`."""
    demo.description = DESCRIPTION
    demo.add_argument("--shards", type=int, default=4, help="shards to generate (default 4)")
    demo.add_argument("--samples-per-shard", type=int, default=24, help="samples per shard (default 24)")
    demo.add_argument("--workdir", type=Path, help="where generated shards and the model go (default .cache/demo)")


def run_command(args: argparse.Namespace) -> int:
    return run_demo(shards=args.shards, samples_per_shard=args.samples_per_shard, workdir=args.workdir or WORKDIR)


def _demo_shards(directory: Path, shards: int, samples_per_shard: int) -> list[Path]:
    """Synthetic scenes in mixed formats and sizes; the first shard also carries broken and odd images."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(shards):
        samples = synthetic_samples(
            samples_per_shard,
            seed=index,
            key_prefix=f"img{index:03d}",
            extensions=("jpg", "png", "webp"),
            sizes=((64, 64), (96, 64), (48, 80)),
            questions=shape_presence_questions if index % 2 == 0 else None,
        )
        if index == 0:
            for name in ("cmyk_jpeg", "png_rgba", "truncated_jpeg", "text_as_jpg"):
                samples.append({"__key__": f"img{index:03d}-{name}", "jpg": tricky.TRICKY_IMAGES[name][0]()})
        random.Random(index).shuffle(samples)
        path = directory / f"shard-{index:05d}.tar"
        write_shard(path, samples)
        paths.append(path)
    return paths


def run_demo(
    *, shards: int = 4, samples_per_shard: int = 24, workdir: Path = WORKDIR, job_path: Path = DEMO_JOB
) -> int:
    if not job_path.is_file():
        raise PipelineError(f"the demo job {job_path} is missing; run the demo from a checkout of the repository")
    if not (DEMO_MODEL / "model.safetensors").is_file():
        raise PipelineError(f"the demo model {DEMO_MODEL} is missing; run the demo from a checkout of the repository")
    if workdir.exists():
        shutil.rmtree(workdir)
    shard_paths = _demo_shards(workdir / "shards", shards, samples_per_shard)

    with local_s3() as s3, s3.as_environment():
        print(f"local S3 server at {s3.endpoint_url}, bucket s3://{BUCKET}")
        fs = s3.filesystem()
        fs.mkdir(BUCKET)
        for path in shard_paths:
            fs.put_file(str(path), f"{BUCKET}/shards/{path.name}")
        fs.put(str(DEMO_MODEL), f"{BUCKET}/models/tiny-llava-shapes", recursive=True)
        print(f"uploaded {len(shard_paths)} shards and the tiny LLaVA trained on shapes ({DEMO_MODEL.name})")

        job = load_job(
            job_path,
            inputs=[f"s3://{BUCKET}/shards/shard-{{00000..{shards - 1:05d}}}.tar"],
        )
        job = job.model_copy(update={"model": job.model.model_copy(update={"cache_dir": str(workdir / "model-cache")})})
        result = run_job(job)
        if result.exit_code == 0:
            questions = list(job.tasks.vqa.questions) if job.tasks.vqa else []
            _show_rows(fs, job.output.url, questions)
    return result.exit_code


def _show_rows(fs, output_url: str, job_questions: list[str], limit: int = 6) -> None:
    table = ds.dataset(output_url.removeprefix("s3://"), filesystem=fs, format="parquet").to_table(
        columns=["key", "image_format", "caption", "tags", "vqa", "metadata", "error", "error_reason"]
    )
    print(f"\n{table.num_rows} rows in {output_url}; a few of them:")
    failures = table.filter(ds.field("error_reason").is_valid()).to_pylist()[:2]
    succeeded = table.filter(ds.field("error_reason").is_null()).to_pylist()
    for row in succeeded[: limit - len(failures)] + failures:
        print(f"  {row['key']} ({row['image_format']}):")
        if row["error_reason"]:
            print(f"      error_reason: {row['error_reason']}")
            continue
        print(f"      caption: {row['caption']!r}")
        print(f"      tags:    {row['tags']}")
        for qa in row["vqa"] or []:
            print(f"      Q: {qa['question']}  A: {qa['answer']!r}")
        if row["metadata"]:
            print(f"      truth:   {json.loads(row['metadata'])['caption']!r}")
    # Generated samples carry their ground truth; the tricky images added to show error rows do not.
    judged = [row for row in succeeded if row["metadata"]]
    right = sum(all(correct for _, correct, _ in row_checks(row, job_questions)) for row in judged)
    print(
        f"\n{right} of {len(judged)} generated images got a caption, tags and answers that all match their own "
        "ground truth. The bundled model is a tiny LLaVA trained only on these shapes (see "
        "pipeline/tools/train_shapes.py); point --model at a real checkpoint (e.g. llava-hf/llava-1.5-7b-hf) "
        "for real photos."
    )
