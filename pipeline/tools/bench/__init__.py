"""`llava-pipeline bench`: the pipeline's throughput against the bare model loop, in one run.

On the same generated shards, model and batch size it measures

1. the bare loop: images already decoded and preprocessed in memory, fed batch after batch to the same
   `Generator.generate_for_images` the model stage calls. Nothing the pipeline adds can beat it, so it
   is the limit the pipeline is measured against;
2. the full pipeline: shards on a local S3 server -> read -> prepare actors -> model actors -> Parquet,
   through `run_job`, with Ray started here so the job itself is what is timed;
3. (optionally) several tasks against one: caption alone, caption + tags + 3 questions with the shared
   prefix, and the same five prompts each generated as a whole prompt.

It prints images per second for both, their ratio (pipeline steady state ÷ bare), the time to the first
output row, the fraction of wall time the model actors spend generating, per-stage busy time and peak
memory of the driver and the Ray workers, and writes all of it as JSON so runs can be compared.

Modules by concern: `options` (BenchOptions, Figures), `machine` (machine facts), `workload` (tasks, generated
shards, in-memory requests, batch sizes), `bare` (the bare loop and the several-tasks comparison), `memory`
(MemorySampler), `pipeline_run` (the Ray + S3 pipeline run), `report` (ratios and rendering), `run`
(`run_bench`, the whole run) and `command` (the CLI's options).
"""

from pipeline.tools.bench.options import BenchOptions, Figures
from pipeline.tools.bench.run import run_bench

__all__ = ["BenchOptions", "Figures", "run_bench"]
