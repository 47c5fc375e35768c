"""The whole bench run: machine facts, model and shards, then the bare loop, several tasks and the pipeline."""

from __future__ import annotations

import gc
import os
import time
from dataclasses import asdict, replace

from pipeline.testing.bench_model import SHAPES, build_bench_llava
from pipeline.tools.bench.bare import bare_loop, multitask
from pipeline.tools.bench.machine import machine_facts
from pipeline.tools.bench.options import BenchOptions, Figures
from pipeline.tools.bench.pipeline_run import run_pipeline
from pipeline.tools.bench.report import jsonable, ratios, render, write_figures
from pipeline.tools.bench.workload import default_batch_size, generate_shards, shards_for


def run_bench(options: BenchOptions, echo=print, *, s3=None) -> Figures:
    """Measure; print the figures with `echo` and return them (also written to `options.json_path`).

    `s3`: a running `pipeline.testing.s3_server.LocalS3` for the pipeline run instead of a server of its own;
    where Ray is already initialized in this process the pipeline run joins it (see `pipeline_run`).
    """
    import torch

    if options.model not in SHAPES:
        raise ValueError(f"model must be one of {', '.join(SHAPES)}")
    if options.model == "7b" and not torch.cuda.is_available():
        echo("warning: the 7b shape on CPU needs ~28 GB for float32 weights and hours per batch")
    if options.batch_size is None:
        options = replace(options, batch_size=default_batch_size(options))
    if options.shard_size is None:
        options = replace(options, shard_size=2 * options.batch_size)
    figures = Figures(machine=machine_facts(), options=jsonable(asdict(options)), model={})
    echo(
        f"machine: {figures.machine['cpus']} CPUs ({figures.machine['cpu_model']}), load average "
        f"{figures.machine['load_average']}" + (f", {figures.machine['gpu']}" if "gpu" in figures.machine else "")
    )
    started = time.perf_counter()
    model_dir = build_bench_llava(
        options.workdir / "models" / options.model, shape=options.model, new_tokens=options.new_tokens
    )
    shape = SHAPES[options.model]
    figures.model = {
        "shape": options.model,
        "path": str(model_dir),
        "image_tokens": shape.image_tokens,
        "vision_layers": shape.vision_layers,
        "text_layers": shape.text_layers,
        "text_hidden": shape.text_hidden,
        "new_tokens": options.new_tokens,
    }
    needed = max(options.images, options.bare_images or 0, options.multitask_images)
    shards = generate_shards(
        options.workdir / "shards" / f"{needed}x{options.image_size}-{options.shard_size}",
        images=needed,
        shard_size=options.shard_size,
        image_size=options.image_size,
        seed=options.seed,
    )
    shards = shards_for(shards, options.images, options.shard_size)
    echo(f"prepared {options.model} model and {len(shards)} shard(s) in {time.perf_counter() - started:.1f} s")

    if options.bare_images != 0:
        figures.bare = bare_loop(model_dir, shards, options, echo)
        gc.collect()
    if options.multitask_images:
        figures.multitask = multitask(model_dir, shards, options, echo)
        gc.collect()
    figures.pipeline = run_pipeline(model_dir, shards, options, echo, s3=s3)
    figures.ratio = ratios(figures)
    figures.machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    echo(render(figures))
    write_figures(figures, options.json_path, echo)
    return figures
