"""`llava-pipeline bench --model none`: what the CPU side and the driver can feed, with the model taken out.

The model stage is replaced by `FixedAnswerStage`: it unpacks, stacks and scales every image's inputs as
the real stage does before `generate`, then answers every prompt with a fixed text. What is measured is
therefore read -> decode -> preprocess -> transfer to the model stage -> parse -> driver commit, on
photo-like JPEGs of realistic sizes (`pipeline.testing.photos`) and with the preprocessing of real
checkpoints (LLaVA-1.5 at 336 px, LLaVA-NeXT's any-resolution tiles; `build_processor_checkpoint`).

Two measurements:

1. **Per core**: each stage's own callable, in this process on one thread, over the same blocks Ray would
   hand it; CPU seconds per image give images/s per core, and the blocks' Arrow sizes give the bytes each
   image carries from one stage to the next. Prepare is measured as configured (uint8 pixels, reduced-scale
   JPEG decode) and as the code before both (float32 pixels, full decode) on the same images.
2. **The pipeline**: the whole job through Ray and a local S3 server, with the fixed-answer model stage:
   images/s, the time to the first row and to the first committed shard, and the driver's own busy time,
   which gives the rows per second one driver can commit.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from pipeline.config import GenerationConfig, ModelConfig
from pipeline.model_source import ModelSource, local_model_dir
from pipeline.stages.base import MapStage
from pipeline.stages.generate import MODEL, GenerateStage

FIXED_ANSWER = "a photo of a town under a wide sky"


class FixedAnswers:
    """Stands in for `Generator`: the inputs are stacked, moved and scaled as for `generate`; no forward pass."""

    def __init__(self, processor):
        from pipeline.generator import resolve_device
        from pipeline.inputs import PixelScaling

        self.device = resolve_device(ModelConfig(source="none"))
        self.pixel_scaling = PixelScaling.of(processor.image_processor)

    def generate_for_images(self, requests) -> list[list[str]]:
        from pipeline.generator import Answer, collate_images, scale_pixels

        batch = collate_images([request.image for request in requests])
        pixels = batch["pixel_values"].to(self.device)
        if pixels.dtype.is_floating_point is False:
            pixels = scale_pixels(pixels, self.pixel_scaling)
        float(pixels.sum())  # the values are really computed (and synchronized on a GPU)
        answer = Answer(FIXED_ANSWER, generated_tokens=0)  # nothing generated
        return [[answer] * len(request.token_ids) for request in requests]

    def release_memory(self) -> None:
        pass


class FixedAnswerStage(GenerateStage):
    """The model stage without a model: loads only the processor, answers every prompt with `FIXED_ANSWER`."""

    def load_generator(self, model: ModelSource, model_config: ModelConfig, generation: GenerationConfig):
        from pipeline.inputs import load_processor

        return FixedAnswers(load_processor(local_model_dir(model, files="processor"), model_config))


FIXED_MODEL = MapStage(fn=FixedAnswerStage, section=MODEL.section, constructor_kwargs=MODEL.constructor_kwargs)


def capacity_stages():
    from pipeline.stages import STAGES

    return tuple(FIXED_MODEL if stage is MODEL else stage for stage in STAGES)


# --- options and figures ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CapacityOptions:
    families: tuple[str, ...] = ("llava-1.5", "llava-next")
    # Per-core figures: images of each size, decoded and preprocessed one after another.
    sizes: tuple[tuple[int, int], ...] = ((640, 480), (1024, 768), (1600, 1200), (2048, 1536))
    per_size_images: int = 24
    # The pipeline run: mixed sizes, realistic shards.
    images: int = 384
    shard_size: int = 128
    prepare_actors: int | None = None
    pipeline_family: str = "llava-1.5"
    # The driver's commit rate: shards of realistic size (WebDataset shards hold hundreds to thousands of samples).
    driver_shards: int = 8
    driver_rows_per_shard: int = 1000
    json_path: Path | None = None
    workdir: Path = Path(".cache/bench")
    seed: int = 0


@dataclass
class CapacityFigures:
    machine: dict[str, object]
    options: dict[str, object]
    per_core: dict[str, object] = field(default_factory=dict)
    driver: list[dict[str, object]] = field(default_factory=list)
    pipeline: dict[str, object] = field(default_factory=dict)


# --- 1. per core -------------------------------------------------------------------------------------


def _cpu_seconds(fn):
    started = time.process_time()
    result = fn()
    return result, time.process_time() - started


def _jobconfig(model_dir: Path, reduced_scale: bool = True):
    from pipeline.config import JobConfig

    return JobConfig.model_validate(
        {
            "name": "capacity",
            "input": {"urls": ["/dev/null/shard-{000000..000001}.tar"]},
            "output": {"url": "/dev/null/out/"},
            "model": {"source": str(model_dir)},
            "tasks": {"caption": {}},
            "decode": {"reduced_scale": reduced_scale},
        }
    )


def per_core(model_dir: Path, shard: Path, images: int, family: str) -> dict[str, object]:
    """Each stage's callable over one shard's blocks, on this thread: CPU seconds per image, bytes per image."""
    import torch

    from pipeline.config import StorageConfig
    from pipeline.shards import Shard
    from pipeline.stages.parse import ParseStage
    from pipeline.stages.prepare import PrepareStage
    from pipeline.stages.read import ShardReader, read_shard

    torch.set_num_threads(1)
    job = _jobconfig(model_dir)
    source = ModelSource.from_config(job.model, StorageConfig())
    reader = ShardReader(input=job.input, stage=job.stages.read, storage=StorageConfig())
    read_out, read_cpu = _cpu_seconds(
        lambda: pa.concat_tables(read_shard(Shard(url=str(shard), name=shard.stem, size=None), reader))
    )
    figures: dict[str, object] = {"images": images, "image_bytes_per_image": _bytes(read_out, images)}

    def stage_figures(name: str, stage, table: pa.Table) -> pa.Table:
        stage(table.slice(0, 2))  # first call: lazy imports, caches
        out, cpu = _cpu_seconds(lambda: stage(table))
        figures[name] = {
            "cpu_ms_per_image": round(1000 * cpu / images, 2),
            "images_per_second_per_core": round(images / cpu, 1),
            "bytes_out_per_image": _bytes(out, images),
        }
        return out

    figures["read"] = {
        "cpu_ms_per_image": round(1000 * read_cpu / images, 2),
        "images_per_second_per_core": round(images / read_cpu, 1),
        "bytes_out_per_image": _bytes(read_out, images),
    }
    prepare = PrepareStage(source, job.model, job.tasks, job.decode)
    prepared = stage_figures("prepare", prepare, read_out)
    # The code before issue 14, on the same images: float32 pixels out of the processor, full-size decode.
    before = PrepareStage(source, job.model, job.tasks, _jobconfig(model_dir, reduced_scale=False).decode)
    before.builder.uint8_pixels = False
    stage_figures("prepare_float32_full_decode", before, read_out)
    answered = stage_figures(
        "model_transfer", FixedAnswerStage(source, job.model, job.generation, job.tasks, job.stages.model), prepared
    )
    parsed = stage_figures("parse", ParseStage(job.tasks, None), answered)
    figures["family"] = family
    figures["_parsed"] = parsed  # the rows the driver receives, for the commit benchmark (not written out)
    return figures


def _bytes(table: pa.Table, images: int) -> int:
    return int(table.nbytes / images)


# --- 2. the driver -----------------------------------------------------------------------------------------


def driver_commit_rate(
    parsed: pa.Table,
    *,
    shards: int,
    rows_per_shard: int,
    batch_rows: int,
    s3,
    commit_threads: int = 4,
    endpoint_url: str | None = None,
) -> dict:
    """Rows/s through the driver's own code (admit, count, commit to the local S3 server): `shards` shards of
    `rows_per_shard` rows made from real parse-stage rows, arriving in batches of `batch_rows`."""
    import pyarrow.compute as pc

    from pipeline import rows
    from pipeline.config import OutputConfig, RetryConfig, StorageConfig
    from pipeline.layout import OutputLayout
    from pipeline.schema import schema_for
    from pipeline.shards import Shard
    from pipeline.summary import RunStats
    from pipeline.writer import ShardCommitter

    samples = parsed.filter(pc.equal(parsed.column(rows.RECORD), rows.SAMPLE))
    end = parsed.filter(pc.equal(parsed.column(rows.RECORD), rows.SHARD_END))
    prefix = f"driver-{int(time.time() * 1000)}"
    fs = s3.filesystem()
    if not fs.exists("bench"):
        fs.mkdir("bench")
    storage = StorageConfig(endpoint_url=endpoint_url or s3.endpoint_url)
    layout = OutputLayout(f"s3://bench/{prefix}/out/", storage, RetryConfig())
    shard_list = [Shard(url=f"s3://bench/{prefix}/shards/{i:05d}.tar", name=f"{i:05d}") for i in range(shards)]
    committer = ShardCommitter(
        layout=layout,
        shards=shard_list,
        schema=schema_for(),
        constants={"model": "none", "settings": "{}", "run_id": prefix},
        run_id=prefix,
        compression=OutputConfig(url="s3://bench/x/").compression,
        commit_threads=commit_threads,
    )
    batches = []
    for shard in shard_list:
        table = samples.take(pa.array([i % samples.num_rows for i in range(rows_per_shard)], pa.int64()))
        table = rows.set_column(table, "shard", pa.array([shard.url] * rows_per_shard, pa.string()))
        table = rows.set_column(table, "key", pa.array([f"{i:08d}" for i in range(rows_per_shard)], pa.string()))
        table = rows.set_column(table, rows.INDEX, pa.array(range(rows_per_shard), table.schema.field(rows.INDEX).type))
        tail = rows.set_column(end, "shard", pa.array([shard.url], pa.string()))
        tail = rows.set_column(
            tail, rows.SHARD_SAMPLES, pa.array([rows_per_shard], end.schema.field(rows.SHARD_SAMPLES).type)
        )
        table = pa.concat_tables([table, tail])
        batches += [table.slice(start, batch_rows) for start in range(0, table.num_rows, batch_rows)]
    stats = RunStats()
    started_wall, started_cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        stats.observe(committer.admit(batch))
        committer.commit_ready()
    committer.drain()
    committer.close()
    wall, cpu = time.perf_counter() - started_wall, time.process_time() - started_cpu
    committed = sum(r.rows_written for r in committer.committed)
    assert committed == shards * rows_per_shard, f"committed {committed} rows"
    return {
        "shards": shards,
        "rows_per_shard": rows_per_shard,
        "batch_rows": batch_rows,
        "commit_threads": commit_threads,
        "seconds": round(wall, 3),
        "rows_per_second": round(committed / wall, 1),
        "cpu_seconds": round(cpu, 3),
        "rows_per_cpu_second": round(committed / cpu, 1),
    }


# A remote object store's round trip for a small request; the local server answers in well under 1 ms.
REMOTE_LATENCY_S = 0.03


def driver_figures(parsed: pa.Table, s3, echo, *, shards: int, rows_per_shard: int) -> list[dict[str, object]]:
    """The driver's commit rate on the local server as it is, and behind `REMOTE_LATENCY_S` per request."""
    from pipeline.testing.fault_proxy import FaultProxy

    found = []
    with FaultProxy(s3.endpoint_url, error_rate=0, drop_rate=0, latency_s=REMOTE_LATENCY_S) as remote:
        for latency, endpoint in ((0.0, s3.endpoint_url), (REMOTE_LATENCY_S, remote.endpoint_url)):
            driver_commit_rate(parsed, shards=1, rows_per_shard=8, batch_rows=16, s3=s3, endpoint_url=endpoint)
            for threads in (1, 4):
                figures = driver_commit_rate(
                    parsed, shards=shards, rows_per_shard=rows_per_shard, batch_rows=16, s3=s3, commit_threads=threads,
                    endpoint_url=endpoint,
                )  # fmt: skip
                figures["request_latency_ms"] = round(1000 * latency)
                found.append(figures)
                echo(
                    f"  driver: {figures['rows_per_second']:7.0f} rows/s committed ({threads} commit thread(s), "
                    f"{1000 * latency:.0f} ms per request), {figures['rows_per_cpu_second']:.0f} rows per CPU-second"
                )
    return found


# --- 3. the pipeline -------------------------------------------------------------------------------------


def run_capacity_pipeline(model_dir: Path, shards: list[Path], options: CapacityOptions, echo, s3):
    import ray

    from pipeline.config import JobConfig
    from pipeline.runner import run_job
    from pipeline.tools.bench.memory import MemorySampler

    cpus = os.cpu_count() or 1
    prepare_actors = options.prepare_actors or max(1, cpus - 1)
    logical_cpus = prepare_actors + 2  # the model stage's actor and half a CPU each for reads and parses
    prefix = f"capacity-{int(time.time() * 1000)}"
    with contextlib.ExitStack() as stack:
        fs = s3.filesystem()
        if not fs.exists("bench"):
            fs.mkdir("bench")
        for path in shards:
            fs.put_file(str(path), f"bench/{prefix}/shards/{path.name}")
        job = JobConfig.model_validate(
            {
                "name": "capacity",
                "input": {"urls": [f"s3://bench/{prefix}/shards/shard-*.tar"]},
                "output": {"url": f"s3://bench/{prefix}/out/"},
                "model": {"source": str(model_dir), "device": "cpu"},
                "tasks": {"caption": {}},
                "stages": {
                    "read": {"num_cpus": 0.5},
                    "prepare": {"concurrency": prepare_actors, "num_cpus": 1, "batch_size": 16},
                    "model": {"concurrency": 1, "num_cpus": 1, "num_gpus": 0, "batch_size": 16},
                    "parse": {"num_cpus": 0.5},
                },
                "ray": {"progress_bars": False},
            }
        )
        if not ray.is_initialized():
            ray.init(
                address="local",
                num_cpus=logical_cpus,
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": {"TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}},
            )
            stack.callback(ray.shutdown)
        echo(
            f"pipeline: {options.images} photos in {len(shards)} shard(s) from s3://bench/{prefix}/shards, "
            f"{prepare_actors} prepare actor(s), fixed-answer model stage ({options.pipeline_family} inputs)"
        )
        with MemorySampler(exclude=(s3.process.pid,)) as memory:
            result = run_job(job, echo=lambda line: None, stages=capacity_stages())
    summary = result.summary
    if result.exit_code != 0:
        raise RuntimeError(f"the capacity run failed: {summary.get('error')}")
    images = summary["samples"]["read"]
    return {
        "images": images,
        "succeeded": summary["samples"]["succeeded"],
        "shards": len(shards),
        "wall_seconds": summary["wall_seconds"],
        "images_per_second": summary["images_per_second"],
        "seconds_to_first_row": summary["seconds_to_first_row"],
        "seconds_to_first_commit": summary["seconds_to_first_commit"],
        "driver": summary["driver"],
        "stage_busy_seconds": {stage: info["busy_seconds"] for stage, info in summary["stages"].items()},
        "prepare_actors": prepare_actors,
        "memory": memory.figures(),
    }


# --- the whole run ---------------------------------------------------------------------------------------


def run_capacity(options: CapacityOptions, echo=print, *, s3=None) -> CapacityFigures:
    from dataclasses import asdict

    from pipeline.testing.bench_model import build_processor_checkpoint
    from pipeline.testing.photos import write_photo_shards
    from pipeline.testing.s3_server import local_s3
    from pipeline.tools.bench.machine import machine_facts
    from pipeline.tools.bench.report import jsonable, write_figures

    figures = CapacityFigures(machine=machine_facts(), options=jsonable(asdict(options)))
    echo(f"machine: {figures.machine['cpus']} CPUs ({figures.machine['cpu_model']})")
    photos = options.workdir / "photos"
    per_size: dict[str, list[Path]] = {}
    for width, height in options.sizes:
        per_size[f"{width}x{height}"] = _cached_shards(
            photos / f"{width}x{height}-{options.per_size_images}",
            lambda d, w=width, h=height: write_photo_shards(
                d,
                images=options.per_size_images,
                shard_size=options.per_size_images,
                sizes=((w, h),),
                seed=options.seed,
            ),
        )
    mixed = _cached_shards(
        photos / f"mixed-{options.images}-{options.shard_size}",
        lambda d: write_photo_shards(
            d, images=options.images, shard_size=options.shard_size, sizes=options.sizes, seed=options.seed + 10_000
        ),
    )
    for family in options.families:
        model_dir = build_processor_checkpoint(options.workdir / "models" / f"processor-{family}", family)
        rows = {}
        for size, [shard] in per_size.items():
            rows[size] = per_core(model_dir, shard, options.per_size_images, family)
            p = rows[size]["prepare"]
            echo(
                f"  {family:10s} {size:>9s}  prepare {p['images_per_second_per_core']:6.1f} images/s/core "
                f"({rows[size]['prepare_float32_full_decode']['images_per_second_per_core']:.1f} before), "
                f"{p['bytes_out_per_image'] / 1024:.0f} KiB/image to the model stage"
            )
        figures.per_core[family] = rows
    model_dir = build_processor_checkpoint(
        options.workdir / "models" / f"processor-{options.pipeline_family}", options.pipeline_family
    )
    parsed = None  # the pipeline family's parse-stage rows, which the driver benchmark replicates
    for family, rows in figures.per_core.items():
        for row in rows.values():
            found = row.pop("_parsed")
            parsed = found if parsed is None and family == options.pipeline_family else parsed
    with contextlib.ExitStack() as stack:
        if s3 is None:
            s3 = stack.enter_context(local_s3())
        stack.enter_context(s3.as_environment())
        if parsed is not None:
            figures.driver = driver_figures(
                parsed, s3, echo, shards=options.driver_shards, rows_per_shard=options.driver_rows_per_shard
            )
        figures.pipeline = run_capacity_pipeline(model_dir, mixed, options, echo, s3=s3)
    echo(render_capacity(figures))
    write_figures(figures, options.json_path, echo)
    return figures


def _cached_shards(directory: Path, make) -> list[Path]:
    done = directory / "done.json"
    if done.is_file():
        return [directory / name for name in json.loads(done.read_text())]
    paths = make(directory)
    done.write_text(json.dumps([p.name for p in paths]))
    return paths


def render_capacity(figures: CapacityFigures) -> str:
    lines = ["capacity (model stage answers without a forward pass):"]
    for family, rows in figures.per_core.items():
        lines.append(f"  {family}: images/s per core (CPU ms per image), bytes per image into the next stage")
        lines.append(
            f"    {'photo':>9s}  {'read':>14s}  {'prepare':>14s}  {'before':>7s}  {'model transfer':>15s}  {'parse':>14s}"
            f"  {'JPEG':>8s} {'to model':>9s}"
        )
        for size, r in rows.items():
            cells = [
                f"{r[s]['images_per_second_per_core']:7.0f} ({r[s]['cpu_ms_per_image']:4.1f})"
                for s in ("read", "prepare")
            ]
            lines.append(
                f"    {size:>9s}  {cells[0]:>14s}  {cells[1]:>14s}  "
                f"{r['prepare_float32_full_decode']['images_per_second_per_core']:7.0f}  "
                f"{r['model_transfer']['images_per_second_per_core']:8.0f} ({r['model_transfer']['cpu_ms_per_image']:4.1f})"
                f"  {r['parse']['images_per_second_per_core']:7.0f} ({r['parse']['cpu_ms_per_image']:4.1f})"
                f"  {r['image_bytes_per_image'] / 1024:6.0f}Ki {r['prepare']['bytes_out_per_image'] / 1024:7.0f}Ki"
            )
    for d in figures.driver:
        lines.append(
            f"  driver commits {d['rows_per_second']:7.0f} rows/s with {d['commit_threads']} commit thread(s) at "
            f"{d['request_latency_ms']} ms per request ({d['shards']} shards of {d['rows_per_shard']} rows; "
            f"{d['rows_per_cpu_second']:.0f} rows per CPU-second)"
        )
    p = figures.pipeline
    if p:
        driver = p["driver"]
        lines.append(
            f"  pipeline: {p['images']} photos in {p['wall_seconds']:.1f} s ({p['images_per_second']:.1f} images/s), "
            f"first row {p['seconds_to_first_row']:.1f} s, first committed shard {p['seconds_to_first_commit']:.1f} s"
        )
        lines.append(
            f"  driver:   {driver['busy_seconds']:.2f} s busy for {p['images']} rows: "
            f"{driver['rows_per_busy_second'] or 0:.0f} rows/s committed per busy second"
        )
    return "\n".join(lines)
