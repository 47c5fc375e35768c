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
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import tarfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from pipeline.testing.bench_model import SHAPES, build_bench_llava

REPO = Path(__file__).resolve().parents[1]
WORKDIR = REPO / ".cache" / "bench"
BUCKET = "bench"
QUESTIONS = ["What shape is in the image?", "What colour is the shape?", "What colour is the background?"]


@dataclass(frozen=True)
class BenchOptions:
    images: int = 64
    batch_size: int | None = None  # None: 8 on CPU, sized from free memory on a GPU (gpu_batch_size)
    tasks: str = "caption"  # "caption", or "all": caption + tags + 3 questions
    model: str = "bench"  # a shape in pipeline.testing.bench_model.SHAPES
    new_tokens: int = 16
    device: str = "auto"
    # None: two model batches. Ray Data hands a stage one task per input block and emits a task's output as
    # one block, and a read task's blocks are coalesced up to DataContext.target_max_block_size (128 MiB), so
    # results reach the driver about a shard at a time: small shards give the steady-state window many points.
    shard_size: int | None = None
    image_size: int = 256  # generated images are this square size, larger than every model's input
    bare_images: int | None = None  # None: as many as the pipeline run; 0 skips the bare loop
    multitask_images: int = 0  # 0 skips the caption vs several-tasks comparison
    model_cpus: float | None = None  # None: every core on CPU (torch uses as many threads), 1 with a GPU
    prepare_actors: int | None = None  # None: sized from the cores left over
    max_tasks_in_flight: int = 2
    json_path: Path | None = None
    workdir: Path = WORKDIR
    seed: int = 0


@dataclass
class Figures:
    """Everything one bench run measured; written as JSON."""

    machine: dict[str, object]
    options: dict[str, object]
    model: dict[str, object]
    bare: dict[str, object] | None = None
    multitask: dict[str, object] | None = None
    pipeline: dict[str, object] = field(default_factory=dict)
    ratio: dict[str, object] = field(default_factory=dict)


# --- the machine --------------------------------------------------------------------------------------


def machine_facts() -> dict[str, object]:
    import torch

    facts: dict[str, object] = {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(_total_memory() / 2**30, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return facts


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _total_memory() -> int:
    import psutil

    return psutil.virtual_memory().total


# --- inputs ---------------------------------------------------------------------------------------------


def tasks_config(kind: str, new_tokens: int):
    """The benchmark's tasks; every task generates exactly `new_tokens` (the checkpoint's min_new_tokens)."""
    from pipeline.config import TasksConfig

    if kind == "caption":
        return TasksConfig(caption={"max_new_tokens": new_tokens})
    if kind == "all":
        return TasksConfig(
            caption={"max_new_tokens": new_tokens},
            tags={"max_new_tokens": new_tokens},
            vqa={"questions": QUESTIONS, "max_new_tokens": new_tokens},
        )
    raise ValueError(f"tasks must be caption or all, not {kind!r}")


def generate_shards(directory: Path, *, images: int, shard_size: int, image_size: int, seed: int) -> list[Path]:
    """JPEG scenes in WebDataset shards, reused when a previous run made the same set."""
    from pipeline.testing.shards import write_shards

    recipe = {"images": images, "shard_size": shard_size, "image_size": image_size, "seed": seed}
    marker = directory / "recipe.json"
    shards = math.ceil(images / shard_size)
    paths = [directory / f"shard-{i:05d}.tar" for i in range(shards)]
    if marker.is_file() and json.loads(marker.read_text()) == recipe and all(p.is_file() for p in paths):
        return paths
    directory.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    for old in directory.glob("shard-*.tar"):
        old.unlink()
    full, last = divmod(images, shard_size)
    paths = write_shards(
        directory, shards=full, samples_per_shard=shard_size, seed=seed, sizes=((image_size, image_size),)
    )
    if last:
        paths += write_shards(
            directory,
            shards=1,
            samples_per_shard=last,
            seed=seed + 1,
            name=f"shard-{full:05d}.tar",
            sizes=((image_size, image_size),),
        )
    marker.write_text(json.dumps(recipe))
    return paths


def _image_bytes(paths: list[Path], limit: int) -> list[bytes]:
    found: list[bytes] = []
    for path in paths:
        with tarfile.open(path) as archive:
            for member in archive:
                if member.name.endswith(".jpg"):
                    found.append(archive.extractfile(member).read())  # type: ignore[union-attr]
                    if len(found) == limit:
                        return found
    return found


def _requests(processor, tasks, image_bytes: list[bytes]):
    """Model inputs exactly as the prepare stage builds them, kept in memory for the bare loop."""
    from pipeline.generator import ImagePrompts
    from pipeline.images import decode_image
    from pipeline.inputs import InputBuilder
    from pipeline.prompts import prompts_for

    builder = InputBuilder(processor)
    prompts = prompts_for(tasks, list(tasks.vqa.questions) if tasks.vqa else [])
    limits = {"caption": tasks.caption, "tags": tasks.tags, "vqa": tasks.vqa}
    rendered = [builder.render(p.instruction) for p in prompts]
    requests = []
    for data in image_bytes:
        arrays, replacement = builder.image_arrays(decode_image(data, max_pixels=64_000_000).image)
        token_ids = builder.token_ids(rendered, replacement)
        requests.append(ImagePrompts(arrays, token_ids, [limits[p.task].max_new_tokens for p in prompts]))
    return requests


def gpu_batch_size(shape_name: str, prompts_per_image: int, new_tokens: int, free_bytes: int) -> int:
    """Images per model call that fit a GPU with `free_bytes` free after the weights are loaded.

    What grows with the batch is the KV cache (every prompt of every image holds its prefix, its own tokens
    and the generated ones, 2 bytes a value in bfloat16) and the prefill's transient activations (the widest
    is the MLP's, per prefix token). Half the free memory goes to them, leaving room for the allocator's
    fragmentation and for the halving retry of a chunk that still runs out of memory.
    """
    shape = SHAPES[shape_name]
    head_dim = shape.text_hidden // shape.text_heads
    prompt_tokens = shape.image_tokens + 64  # the chat template and an instruction
    kv_per_token = 2 * shape.text_layers * shape.text_kv_heads * head_dim * 2
    kv_per_image = kv_per_token * (prompt_tokens + new_tokens) * prompts_per_image
    prefill_per_image = prompt_tokens * (3 * shape.text_mlp + 4 * shape.text_hidden) * 2
    return max(1, int(0.5 * free_bytes) // (kv_per_image + prefill_per_image))


# --- 1. the bare loop -------------------------------------------------------------------------------------


def _timed_loop(generator, requests, batch_size: int) -> dict[str, object]:
    """Every batch through the model; a first batch before the clock starts (allocator, kernels, caches)."""
    import torch

    chunks = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
    generator.generate_for_images(chunks[0])
    _synchronize(torch)
    started = time.perf_counter()
    for chunk in chunks:
        generator.generate_for_images(chunk)
    _synchronize(torch)
    seconds = time.perf_counter() - started
    return {
        "images": len(requests),
        "seconds": round(seconds, 3),
        "images_per_second": round(len(requests) / seconds, 3),
    }


def _synchronize(torch) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _load_generator(model_dir: Path, options: BenchOptions):
    from pipeline.config import GenerationConfig, ModelConfig
    from pipeline.generator import Generator
    from pipeline.inputs import load_processor

    config = ModelConfig(source=str(model_dir), device=options.device)
    processor = load_processor(str(model_dir), config)
    return Generator(str(model_dir), config, GenerationConfig(), processor), processor


def bare_loop(model_dir: Path, shards: list[Path], options: BenchOptions, echo) -> dict[str, object]:
    import torch

    count = options.images if options.bare_images is None else options.bare_images
    generator, processor = _load_generator(model_dir, options)
    requests = _requests(processor, tasks_config(options.tasks, options.new_tokens), _image_bytes(shards, count))
    echo(f"bare loop: {len(requests)} images in batches of {options.batch_size} ({options.tasks})")
    figures = _timed_loop(generator, requests, options.batch_size)
    figures["device"] = str(generator.device)
    figures["dtype"] = str(generator.dtype).removeprefix("torch.")
    figures["torch_threads"] = torch.get_num_threads()
    return figures


def multitask(model_dir: Path, shards: list[Path], options: BenchOptions, echo) -> dict[str, object]:
    """Caption alone, against caption + tags + 3 questions with and without sharing the image's prefix."""
    generator, processor = _load_generator(model_dir, options)
    images = _image_bytes(shards, options.multitask_images)
    echo(f"several tasks: {len(images)} images, caption alone vs caption + tags + {len(QUESTIONS)} questions")
    caption = _timed_loop(
        generator, _requests(processor, tasks_config("caption", options.new_tokens), images), options.batch_size
    )
    every = _requests(processor, tasks_config("all", options.new_tokens), images)
    shared = _timed_loop(generator, every, options.batch_size)
    generator.shares_prefix = False
    whole = _timed_loop(generator, every, options.batch_size)
    return {
        "prompts_per_image": len(every[0].token_ids),
        "caption": caption,
        "all_tasks_shared_prefix": shared,
        "all_tasks_whole_prompts": whole,
        "shared_cost_vs_caption": round(float(shared["seconds"]) / float(caption["seconds"]), 3),
        "whole_prompts_cost_vs_caption": round(float(whole["seconds"]) / float(caption["seconds"]), 3),
    }


# --- 2. the pipeline -------------------------------------------------------------------------------------


class MemorySampler:
    """Peak resident memory of this process and of every Ray worker under it, sampled on a thread."""

    def __init__(self, interval_s: float = 0.25, exclude: tuple[int, ...] = ()):
        self.interval_s = interval_s
        self.exclude = set(exclude)
        self.driver_peak = 0
        self.workers_peak = 0  # all Ray workers together, at one instant
        self.worker_peak = 0  # the largest single worker
        self.worker_peak_title = ""
        self.ray_system_peak = 0  # raylet, GCS and other Ray daemons together
        # RSS counts the pages of Ray's shared-memory object store a worker has touched, which grow with the
        # data streamed through it up to the store's size; RSS minus shared pages is the memory a process owns.
        self.driver_private_peak = 0
        self.workers_private_peak = 0
        self.worker_private_peak = 0
        self.worker_private_peak_title = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        driver = psutil.Process()
        while not self._stop.is_set():
            own = driver.memory_info()
            self.driver_peak = max(self.driver_peak, own.rss)
            self.driver_private_peak = max(self.driver_private_peak, own.rss - own.shared)
            workers = system = workers_private = 0
            for child in driver.children(recursive=True):
                if child.pid in self.exclude:
                    continue
                try:
                    info = child.memory_info()
                    title = " ".join(child.cmdline()).strip()[:80]
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                rss, private = info.rss, info.rss - info.shared
                if title.startswith("ray::"):
                    workers += rss
                    workers_private += private
                    if rss > self.worker_peak:
                        self.worker_peak, self.worker_peak_title = rss, title
                    if private > self.worker_private_peak:
                        self.worker_private_peak, self.worker_private_peak_title = private, title
                else:
                    system += rss
            self.workers_peak = max(self.workers_peak, workers)
            self.workers_private_peak = max(self.workers_private_peak, workers_private)
            self.ray_system_peak = max(self.ray_system_peak, system)
            self._stop.wait(self.interval_s)

    def figures(self) -> dict[str, object]:
        mib = 2**20
        return {
            "driver_peak_rss_mib": round(self.driver_peak / mib, 1),
            "workers_peak_rss_mib": round(self.workers_peak / mib, 1),
            "largest_worker_peak_rss_mib": round(self.worker_peak / mib, 1),
            "largest_worker": self.worker_peak_title,
            "ray_daemons_peak_rss_mib": round(self.ray_system_peak / mib, 1),
            "driver_peak_private_mib": round(self.driver_private_peak / mib, 1),
            "workers_peak_private_mib": round(self.workers_private_peak / mib, 1),
            "largest_worker_peak_private_mib": round(self.worker_private_peak / mib, 1),
            "largest_private_worker": self.worker_private_peak_title,
        }


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _job(options: BenchOptions, model_dir: Path, prefix: str, model_cpus: float, prepare_actors: int):
    from pipeline.config import JobConfig

    gpu = options.device == "cuda" or (options.device == "auto" and _cuda_available())
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
                # Blocks of one model batch: outputs reach the driver batch by batch, so the first row comes
                # early and the steady-state window (first to last output) is measured at batch resolution.
                "read": {"num_cpus": 0.5, "rows_per_block": options.batch_size},
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


def run_pipeline(model_dir: Path, shards: list[Path], options: BenchOptions, echo) -> dict[str, object]:
    import ray

    from pipeline.runner import run_job
    from pipeline.testing.s3_server import local_s3

    cpus = os.cpu_count() or 1
    gpu = options.device == "cuda" or (options.device == "auto" and _cuda_available())
    # Ray sets a worker's OMP_NUM_THREADS (torch's thread count) to the CPUs it reserved: a model actor on
    # CPU reserves every core so it computes with as many threads as the bare loop does.
    model_cpus = options.model_cpus if options.model_cpus is not None else (1 if gpu else cpus)
    prepare_actors = options.prepare_actors or max(1, min(8, int(cpus - model_cpus) // 2))
    # Logical CPUs: the model's, plus one per prepare actor and half for the read tasks. On a small machine
    # that is more than its cores, on purpose: the stages take turns on them, as they would share a node.
    logical_cpus = math.ceil(model_cpus + prepare_actors + 0.5)
    prefix = f"run-{int(time.time() * 1000)}"
    with local_s3() as s3, s3.as_environment():
        fs = s3.filesystem()
        if not fs.exists(BUCKET):
            fs.mkdir(BUCKET)
        for path in shards:
            fs.put_file(str(path), f"{BUCKET}/{prefix}/shards/{path.name}")
        job = _job(options, model_dir, prefix, model_cpus, prepare_actors)
        echo(
            f"pipeline: {options.images} images from s3://{BUCKET}/{prefix}/shards, model actor with "
            f"{model_cpus:g} CPUs{' and 1 GPU' if gpu else ''}, {prepare_actors} prepare actor(s), "
            f"{logical_cpus} logical CPUs"
        )
        ray.init(
            address="local",  # a Ray of its own, sized for this run, even where RAY_ADDRESS names a cluster
            num_cpus=logical_cpus,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}},
        )
        try:
            with MemorySampler(exclude=(s3.process.pid,)) as memory:
                result = run_job(job, echo=lambda line: None)
        finally:
            ray.shutdown()
    summary = result.summary
    if result.exit_code != 0:
        raise RuntimeError(f"the pipeline run failed: {summary.get('error')}")
    return _pipeline_figures(summary, memory, model_cpus, prepare_actors, logical_cpus)


def _pipeline_figures(summary, memory: MemorySampler, model_cpus, prepare_actors, logical_cpus) -> dict[str, object]:
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


def run_bench(options: BenchOptions, echo=print) -> Figures:
    import torch

    if options.model not in SHAPES:
        raise ValueError(f"model must be one of {', '.join(SHAPES)}")
    if options.model == "7b" and not torch.cuda.is_available():
        echo("warning: the 7b shape on CPU needs ~28 GB for float32 weights and hours per batch")
    if options.batch_size is None:
        options = replace(options, batch_size=_default_batch_size(options))
    if options.shard_size is None:
        options = replace(options, shard_size=2 * options.batch_size)
    figures = Figures(machine=machine_facts(), options=_jsonable(asdict(options)), model={})
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
    shards = _shards_for(shards, options.images, options.shard_size)
    echo(f"prepared {options.model} model and {len(shards)} shard(s) in {time.perf_counter() - started:.1f} s")

    if options.bare_images != 0:
        figures.bare = bare_loop(model_dir, shards, options, echo)
        gc.collect()
    if options.multitask_images:
        figures.multitask = multitask(model_dir, shards, options, echo)
        gc.collect()
    figures.pipeline = run_pipeline(model_dir, shards, options, echo)
    figures.ratio = _ratios(figures)
    figures.machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    echo(render(figures))
    if options.json_path:
        options.json_path.parent.mkdir(parents=True, exist_ok=True)
        options.json_path.write_text(json.dumps(asdict(figures), indent=2) + "\n")
        echo(f"figures written to {options.json_path}")
    return figures


def _default_batch_size(options: BenchOptions) -> int:
    import torch

    gpu = options.device == "cuda" or (options.device == "auto" and torch.cuda.is_available())
    if not gpu:
        return 8
    from pipeline.testing.bench_model import parameter_count

    free, _ = torch.cuda.mem_get_info()
    weights = 2 * parameter_count(options.model)  # bfloat16
    prompts = 1 if options.tasks == "caption" else 2 + len(QUESTIONS)
    return gpu_batch_size(options.model, prompts, options.new_tokens, free - weights)


def _shards_for(paths: list[Path], images: int, shard_size: int) -> list[Path]:
    """The pipeline's shards: the first ones of the generated set, holding `images` images (whole shards)."""
    return paths[: math.ceil(images / shard_size)]


def _ratios(figures: Figures) -> dict[str, object]:
    ratio: dict[str, object] = {}
    if figures.bare:
        bare = float(figures.bare["images_per_second"])  # type: ignore[arg-type]
        steady = figures.pipeline.get("steady_images_per_second")
        ratio["steady_pipeline_over_bare"] = round(float(steady) / bare, 3) if steady else None  # type: ignore[arg-type]
        ratio["end_to_end_pipeline_over_bare"] = round(float(figures.pipeline["images_per_second"]) / bare, 3)  # type: ignore[arg-type]
    return ratio


def _jsonable(values: dict[str, object]) -> dict[str, object]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


def render(figures: Figures) -> str:
    p = figures.pipeline
    lines = [
        f"bench: {figures.model['shape']} model, {figures.options['tasks']} task(s), batch {figures.options['batch_size']}"
    ]
    if figures.bare:
        b = figures.bare
        lines.append(
            f"  bare loop      {b['images_per_second']:.2f} images/s ({b['images']} images in {b['seconds']:.1f} s)"
        )
    lines.append(
        f"  pipeline       {p['steady_images_per_second'] or 0:.2f} images/s steady "
        f"({p['steady_images']} images in {p['steady_seconds'] or 0:.1f} s), {p['images_per_second'] or 0:.2f} "
        f"end to end ({p['images']} in {p['wall_seconds']:.1f} s)"
    )
    if figures.ratio:
        r = figures.ratio
        lines.append(
            f"  ratio          {r['steady_pipeline_over_bare'] or 0:.3f} steady, "
            f"{r['end_to_end_pipeline_over_bare']:.3f} end to end (pipeline ÷ bare)"
        )
    lines.append(f"  first row      {p['seconds_to_first_row'] or 0:.1f} s")
    lines.append(
        f"  model busy     {p['steady_model_busy_fraction'] or 0:.3f} of steady wall time, "
        f"{p['model_busy_fraction'] or 0:.3f} end to end"
    )
    stages = ", ".join(
        f"{s} {v:.1f} s ({p['stage_ms_per_image'][s]} ms/image)" for s, v in p["stage_busy_seconds"].items()
    )
    lines.append(f"  stage busy     {stages}")
    m = p["memory"]
    lines.append(
        f"  peak memory    driver {m['driver_peak_rss_mib']:.0f} MiB, Ray workers {m['workers_peak_rss_mib']:.0f} MiB "
        f"together (largest {m['largest_worker_peak_rss_mib']:.0f} MiB), Ray daemons {m['ray_daemons_peak_rss_mib']:.0f} MiB"
    )
    lines.append(
        f"  (private)      driver {m['driver_peak_private_mib']:.0f} MiB, Ray workers "
        f"{m['workers_peak_private_mib']:.0f} MiB together (largest {m['largest_worker_peak_private_mib']:.0f} MiB)"
    )
    if figures.multitask:
        t = figures.multitask
        lines.append(
            f"  several tasks  caption + tags + {len(QUESTIONS)} questions cost {t['shared_cost_vs_caption']:.2f}x "
            f"caption alone with the shared prefix, {t['whole_prompts_cost_vs_caption']:.2f}x as whole prompts"
        )
    return "\n".join(lines)


# --- the command -------------------------------------------------------------------------------------


def add_bench_command(commands) -> None:
    bench = commands.add_parser(
        "bench",
        help="measure the pipeline against the bare model loop on generated shards",
        description="Generate shards and a random-weight benchmark LLaVA, then measure (1) the bare loop: "
        "preprocessed images in memory fed batch after batch to the model, and (2) the full pipeline from a "
        "local S3 server to Parquet, with the same model and batch size. Prints images/s for both, their "
        "ratio, time to the first row, the model actors' busy fraction, per-stage time and peak memory.",
    )
    bench.add_argument("--images", type=int, default=64, help="images through the pipeline (default 64)")
    bench.add_argument(
        "--batch-size", type=int, help="images per model call (default: 8 on CPU, sized to free memory on a GPU)"
    )
    bench.add_argument(
        "--tasks",
        choices=("caption", "all"),
        default="caption",
        help=f"caption only, or caption + tags + {len(QUESTIONS)} questions (default caption)",
    )
    bench.add_argument(
        "--model",
        choices=tuple(SHAPES),
        default="bench",
        help="tiny: the test model; bench: CPU stand-in for a 7B model (default); 7b: LLaVA-1.5-7B's shapes",
    )
    bench.add_argument("--new-tokens", type=int, default=16, help="tokens generated per prompt (default 16)")
    bench.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="model device")
    bench.add_argument("--shard-size", type=int, help="images per shard (default: two model batches)")
    bench.add_argument("--image-size", type=int, default=256, help="generated images' side in pixels (default 256)")
    bench.add_argument("--bare-images", type=int, help="images through the bare loop (default: --images; 0 skips it)")
    bench.add_argument(
        "--multitask-images",
        type=int,
        default=0,
        help="images for caption alone vs caption + tags + 3 questions in the bare loop (default 0: skipped)",
    )
    bench.add_argument("--model-cpus", type=float, help="CPUs the model actor reserves (default: all on CPU, 1 on GPU)")
    bench.add_argument("--prepare-actors", type=int, help="decode/preprocess actors (default: from spare cores)")
    bench.add_argument("--json", type=Path, dest="json_path", help="write the figures to this JSON file")
    bench.add_argument("--workdir", type=Path, help="where shards and models are generated (default .cache/bench)")


def run_bench_command(args) -> int:
    options = BenchOptions(
        images=args.images,
        batch_size=args.batch_size,
        tasks=args.tasks,
        model=args.model,
        new_tokens=args.new_tokens,
        device=args.device,
        shard_size=args.shard_size,
        image_size=args.image_size,
        bare_images=args.bare_images,
        multitask_images=args.multitask_images,
        model_cpus=args.model_cpus,
        prepare_actors=args.prepare_actors,
        json_path=args.json_path,
        workdir=args.workdir or WORKDIR,
    )
    run_bench(options)
    return 0
