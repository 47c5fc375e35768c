"""2. The full pipeline: shards on a local S3 server -> read -> prepare actors -> model actors -> Parquet,
through `run_job`.

By default the run starts a local S3 server and a Ray of its own, sized for the run, so the job itself is what
is timed. Given a running server (`s3`) it uploads to that one instead, and where Ray is already initialized
in this process it joins that Ray (started with the server's environment, as the test suite's is) and leaves
it running.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

from pipeline.tools.bench.machine import cuda_available
from pipeline.tools.bench.memory import MemorySampler
from pipeline.tools.bench.options import BUCKET, BenchOptions
from pipeline.tools.bench.workload import tasks_config


def bench_job(options: BenchOptions, model_dir: Path, prefix: str, model_cpus: float, prepare_actors: int):
    from pipeline.config import JobConfig

    gpu = options.device == "cuda" or (options.device == "auto" and cuda_available())
    tasks = tasks_config(options.tasks, options.new_tokens)
    return JobConfig.model_validate(
        {
            "name": "bench",
            "input": {"urls": [f"s3://{BUCKET}/{prefix}/shards/shard-*.tar"]},
            "output": {"url": f"s3://{BUCKET}/{prefix}/out/"},
            "model": {
                "source": str(model_dir),
                "device": options.device,
                "cache_dir": str(options.workdir / "model-cache"),
            },
            "tasks": tasks.model_dump(exclude_none=True),
            "stages": {
                "read": {"num_cpus": 0.5},
                "prepare": {"concurrency": prepare_actors, "num_cpus": 1, "batch_size": 16},
                "model": {
                    "concurrency": 1,
                    "num_gpus": 1 if gpu else 0,
                    "num_cpus": model_cpus,
                    "batch_size": options.batch_size,
                    "max_tasks_in_flight_per_actor": options.max_tasks_in_flight,
                },
            },
            "ray": {"progress_bars": False},
        }
    )


def run_pipeline(model_dir: Path, shards: list[Path], options: BenchOptions, echo, s3=None) -> dict[str, object]:
    """Run the bench job; `s3`: a running `pipeline.testing.s3_server.LocalS3` to use instead of starting one."""
    import ray

    from pipeline.runner import run_job
    from pipeline.testing.s3_server import local_s3

    cpus = os.cpu_count() or 1
    gpu = options.device == "cuda" or (options.device == "auto" and cuda_available())
    # Ray sets a worker's OMP_NUM_THREADS (torch's thread count) to the CPUs it reserved: a model actor on
    # CPU reserves every core so it computes with as many threads as the bare loop does.
    model_cpus = options.model_cpus if options.model_cpus is not None else (1 if gpu else cpus)
    prepare_actors = options.prepare_actors or max(1, min(8, int(cpus - model_cpus) // 2))
    # Logical CPUs: the model's, plus one per prepare actor and half for the read tasks. On a small machine
    # that is more than its cores, on purpose: the stages take turns on them, as they would share a node.
    logical_cpus = math.ceil(model_cpus + prepare_actors + 0.5)
    joined = ray.is_initialized()
    if joined:
        available = int(ray.cluster_resources().get("CPU", 0))
        if available < logical_cpus:
            raise ValueError(
                f"the running Ray has {available} CPUs; this bench needs {logical_cpus} "
                f"({model_cpus:g} for the model actor, {prepare_actors} prepare actor(s) and half for reads): "
                "lower model_cpus or prepare_actors"
            )
        logical_cpus = available
    prefix = f"run-{int(time.time() * 1000)}"
    with contextlib.ExitStack() as stack:
        if s3 is None:
            s3 = stack.enter_context(local_s3())
        stack.enter_context(s3.as_environment())
        fs = s3.filesystem()
        if not fs.exists(BUCKET):
            fs.mkdir(BUCKET)
        for path in shards:
            fs.put_file(str(path), f"{BUCKET}/{prefix}/shards/{path.name}")
        job = bench_job(options, model_dir, prefix, model_cpus, prepare_actors)
        echo(
            f"pipeline: {options.images} images from s3://{BUCKET}/{prefix}/shards, model actor with "
            f"{model_cpus:g} CPUs{' and 1 GPU' if gpu else ''}, {prepare_actors} prepare actor(s), "
            f"{logical_cpus} logical CPUs" + (" (the running Ray)" if joined else "")
        )
        if not joined:
            ray.init(
                address="local",  # a Ray of its own, sized for this run, even where RAY_ADDRESS names a cluster
                num_cpus=logical_cpus,
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": {"TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}},
            )
            stack.callback(ray.shutdown)
        with MemorySampler(exclude=(s3.process.pid,)) as memory:
            result = run_job(job, echo=lambda line: None)
    summary = result.summary
    if result.exit_code != 0:
        raise RuntimeError(f"the pipeline run failed: {summary.get('error')}")
    return pipeline_figures(summary, memory, model_cpus, prepare_actors, logical_cpus)


def pipeline_figures(summary, memory: MemorySampler, model_cpus, prepare_actors, logical_cpus) -> dict[str, object]:
    samples = summary["samples"]["read"]
    wall = summary["wall_seconds"]
    busy = {stage: info["busy_seconds"] for stage, info in summary["stages"].items()}
    steady = summary.get("steady_state") or {}
    actors = 1
    figures: dict[str, object] = {
        "images": samples,
        "succeeded": summary["samples"]["succeeded"],
        "wall_seconds": wall,
        "images_per_second": summary["images_per_second"],
        "seconds_to_first_row": summary["seconds_to_first_row"],
        "steady_images": steady.get("samples"),
        "steady_seconds": steady.get("seconds"),
        "steady_images_per_second": steady.get("images_per_second"),
        "model_busy_fraction": round(busy["model"] / (wall * actors), 3) if wall else None,
        "steady_model_busy_fraction": (
            round(steady["model_busy_seconds"] / (steady["seconds"] * actors), 3) if steady.get("seconds") else None
        ),
        "model_calls": steady.get("model_calls"),
        "stage_busy_seconds": busy,
        "stage_ms_per_image": {s: round(1000 * b / samples, 2) if samples else None for s, b in busy.items()},
        "model_actors": actors,
        "model_actor_cpus": model_cpus,
        "prepare_actors": prepare_actors,
        "ray_logical_cpus": logical_cpus,
        "memory": memory.figures(),
    }
    return figures


# --- the whole run ------------------------------------------------------------------------------------
