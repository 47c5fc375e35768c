"""The floor a small job is held to: a plain Ray Data script on the same shards, model and cores.

    read_webdataset(decoder=None) -> map_batches(an actor that decodes, runs the processor and generate)
    -> write_parquet

It has none of the project's safety (no error rows, no exactly-once commit, no resume, no summary), so
`llava-pipeline run` should not take longer than it; `compare_with_plain` runs both as whole processes,
alternated, on one local S3 server, and reports medians. Run alone:

    python -m pipeline.tools.bench.plain --input bucket/shards/shard-00000.tar bucket/shards/shard-00001.tar \
        --output s3://bucket/plain/ --model DIR --cpus 4 --model-cpus 2 --batch-size 8 --new-tokens 16
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Describe the image in one sentence."


class Captioner:
    """Decode, preprocess and generate for a batch, the way a Ray Data user would write it."""

    def __init__(self, model_dir: str, new_tokens: int):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.torch = torch
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
        self.prompt = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        self.new_tokens = new_tokens

    def __call__(self, batch: dict) -> dict:
        from PIL import Image

        images = [Image.open(io.BytesIO(data)).convert("RGB") for data in batch["jpg"]]
        inputs = self.processor(images=images, text=[self.prompt] * len(images), return_tensors="pt", padding=True)
        with self.torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.new_tokens, do_sample=False)
        captions = self.processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return {"key": list(batch["__key__"]), "caption": captions}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="shard paths on the S3 endpoint (bucket/key)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--model-cpus", type=float, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args(argv)

    import ray
    import ray.data
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    dataset = ray.data.read_webdataset(args.input, decoder=None, filesystem=fs)
    dataset = dataset.map_batches(
        Captioner,
        fn_constructor_kwargs={"model_dir": args.model, "new_tokens": args.new_tokens},
        batch_size=args.batch_size,
        concurrency=1,
        num_cpus=args.model_cpus,
    )
    dataset.write_parquet(args.output, filesystem=fs)
    ray.shutdown()
    return 0


# --- side by side ---------------------------------------------------------------------------------------


def compare_with_plain(
    *,
    model_dir: Path,
    shards: list[Path],
    repeats: int,
    batch_size: int,
    new_tokens: int,
    workdir: Path,
    echo,
    prepare_in_model_actors: bool = False,
) -> dict[str, object]:
    """`llava-pipeline run` and the plain script as whole processes, alternated, on one local S3 server.

    With `prepare_in_model_actors` the job sets `stages.prepare.in_model_actors`, the layout the plain script
    has (decode, processor and generate in one actor); otherwise it runs the default prepare pool."""
    import yaml

    from pipeline.testing.s3_server import local_s3

    images = sum(_samples_in(path) for path in shards)
    cpus = os.cpu_count() or 1
    logical = cpus + 3  # the model actor's cores, plus room for a read task, a prepare actor and a parse task
    times: dict[str, list[float]] = {"pipeline": [], "plain": []}
    # From each pipeline run's summary: when its first row reached the driver and its first shard was committed.
    firsts: dict[str, list[float]] = {"seconds_to_first_row": [], "seconds_to_first_commit": []}
    with local_s3() as s3, tempfile.TemporaryDirectory(prefix="node-cache-", dir=workdir) as node_cache:
        fs = s3.filesystem()
        fs.mkdir("plain-vs-pipeline")
        for path in shards:
            fs.put_file(str(path), f"plain-vs-pipeline/shards/{path.name}")
        keys = [f"plain-vs-pipeline/shards/{path.name}" for path in shards]
        environment = {**os.environ, **s3.environment()}
        environment.pop("RAY_ADDRESS", None)  # each process starts a Ray of its own, as a new user's would
        # A node cache of this comparison's own: the first pipeline run checks the processor as a new user's
        # does; the later ones find that check passed, as a node's nightly runs do.
        environment["LLAVA_PIPELINE_CACHE"] = node_cache
        checks: list[dict[str, int]] = []
        for repeat in range(repeats):
            order = ("pipeline", "plain") if repeat % 2 == 0 else ("plain", "pipeline")
            for kind in order:
                output = f"s3://plain-vs-pipeline/{kind}-{repeat}/"
                if kind == "pipeline":
                    job = {
                        "name": "small-job",
                        "input": {"urls": [f"s3://{key}" for key in keys]},
                        "output": {"url": output},
                        "model": {"source": str(model_dir), "device": "cpu"},
                        "tasks": {"caption": {"prompt": PROMPT, "max_new_tokens": new_tokens}},
                        "stages": {
                            "model": {"num_cpus": cpus, "num_gpus": 0, "batch_size": batch_size},
                            **({"prepare": {"in_model_actors": True}} if prepare_in_model_actors else {}),
                        },
                        "ray": {"num_cpus": logical, "progress_bars": False},
                    }
                    job_path = workdir / f"small-job-{repeat}.yaml"
                    job_path.write_text(yaml.safe_dump(job))
                    command = [str(Path(sys.executable).parent / "llava-pipeline"), "run", str(job_path)]
                else:
                    command = [
                        sys.executable, "-m", "pipeline.tools.bench.plain", "--input", *keys, "--output", output,
                        "--model", str(model_dir), "--cpus", str(logical), "--model-cpus", str(cpus),
                        "--batch-size", str(batch_size), "--new-tokens", str(new_tokens),
                    ]  # fmt: skip
                started = time.perf_counter()
                done = subprocess.run(command, env=environment, capture_output=True, text=True)
                seconds = time.perf_counter() - started
                if done.returncode != 0:
                    raise RuntimeError(f"{kind} run failed ({done.returncode}): {done.stderr[-2000:]}")
                rows = _rows_written(fs, output.removeprefix("s3://"))
                times[kind].append(round(seconds, 2))
                detail = ""
                if kind == "pipeline":
                    [summary_path] = fs.glob(f"{output.removeprefix('s3://')}_runs/*.json")
                    summary = json.loads(fs.cat_file(summary_path))
                    for name, values in firsts.items():
                        values.append(summary[name])
                    checks.append(summary["processor_checks"])
                    detail = (
                        f" (first row {summary['seconds_to_first_row']:.1f} s, "
                        f"first commit {summary['seconds_to_first_commit']:.1f} s, "
                        f"processor checks run {summary['processor_checks']['ran']}, "
                        f"passed before {summary['processor_checks']['remembered']})"
                    )
                echo(f"  {kind:8s} run {repeat + 1}: {seconds:.1f} s{detail}, {rows} rows written under {output}")
                if rows != images:
                    raise RuntimeError(f"{kind} run wrote {rows} rows, not {images}")
    median = {kind: statistics.median(values) for kind, values in times.items()}
    # Each repeat's two runs are neighbours in time: their ratio cancels the machine's drift, which on a shared
    # machine moves whole runs by more than the difference measured.
    paired = [round(pipeline / plain, 3) for pipeline, plain in zip(times["pipeline"], times["plain"])]
    return {
        "images": images,
        "pipeline_prepares": "in the model actor" if prepare_in_model_actors else "in a prepare actor pool",
        "repeats": repeats,
        "seconds": times,
        "median_seconds": median,
        "pipeline_firsts": firsts,
        "pipeline_processor_checks": checks,
        "pipeline_over_plain": round(median["pipeline"] / median["plain"], 3),
        "paired_ratios": paired,
        "median_paired_ratio": statistics.median(paired),
    }


def _samples_in(path: Path) -> int:
    import tarfile

    with tarfile.open(path) as archive:
        return sum(1 for member in archive if member.name.endswith(".jpg"))


def _rows_written(fs, prefix: str) -> int:
    import pyarrow.parquet as pq

    files = [p for p in fs.find(prefix) if p.endswith(".parquet") and "/_" not in p[len(prefix) :]]
    return sum(pq.ParquetFile(fs.open(p, "rb")).metadata.num_rows for p in files)


if __name__ == "__main__":
    raise SystemExit(main())
