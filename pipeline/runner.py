"""Running a job: check everything that can be checked, then stream shards through Ray Data.

`plan_job` does all the checking without Ray: shards listed, output writable, checkpoint present,
processor and chat template loadable, vocabulary read. Only then does `run_job` join or start a
Ray cluster and build the dataset: read tasks -> prepare actors (CPU) -> model actors (GPU) -> the
driver, which commits one Parquet file per finished shard and keeps the run's counters.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from pipeline.config import JobConfig, StorageConfig
from pipeline.errors import ConfigError, PipelineError
from pipeline.model_source import ModelSource, check_model_source, local_model_dir
from pipeline.modeling import InputBuilder, load_processor
from pipeline.prompts import TASK_ORDER, parse_vocabulary, prompts_for
from pipeline.schema import load_schema
from pipeline.shards import Shard, expand_shards
from pipeline.stages.generate import GenerateSpec, GenerateStage
from pipeline.stages.prepare import PrepareSpec, PrepareStage
from pipeline.stages.read import ReadSpec, WebDatasetShards
from pipeline.storage import describe_storage_error, filesystem, join, resolve_storage
from pipeline.summary import RunStats, build_summary, render_summary, summary_json
from pipeline.writer import ShardCommitter

log = logging.getLogger(__name__)

RUNS_DIR = "_runs"
_PROGRESS_EVERY_SECONDS = 10.0


@dataclass(frozen=True)
class Plan:
    job: JobConfig
    run_id: str
    shards: list[Shard]
    input_storage: StorageConfig
    output_storage: StorageConfig
    model: ModelSource
    vocabulary: frozenset[str] | None
    settings: str

    @property
    def tasks(self) -> list[str]:
        return [t for t in TASK_ORDER if getattr(self.job.tasks, t) is not None]


@dataclass(frozen=True)
class RunResult:
    summary: dict[str, object]
    summary_url: str | None
    exit_code: int


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def plan_job(job: JobConfig, *, run_id: str | None = None, read_only: bool = False) -> Plan:
    """Every check that needs no Ray; a ConfigError here means nothing was started or written.

    `read_only` (for `validate`) checks that the output location exists instead of writing a probe.
    """
    input_storage = resolve_storage(job.storage_for("input"), job.input.urls[0])
    output_storage = resolve_storage(job.storage_for("output"), job.output.url)
    model = ModelSource.from_config(job.model, resolve_storage(job.storage_for("model"), job.model.source))

    shards = expand_shards(job.input.urls, input_storage)
    _check_output(job.output.url, output_storage, write_probe=not read_only)
    check_model_source(model)
    _check_prompts(job, model)
    vocabulary = _load_vocabulary(job, input_storage)
    return Plan(
        job=job,
        run_id=run_id or new_run_id(),
        shards=shards,
        input_storage=input_storage,
        output_storage=output_storage,
        model=model,
        vocabulary=vocabulary,
        settings=_settings_json(job),
    )


def _check_output(url: str, storage: StorageConfig, *, write_probe: bool) -> None:
    """Check the output location exists, then write and delete a probe, so a missing bucket or a
    denied write stops the run before any work. Never creates a bucket (s3fs's makedirs would)."""
    try:
        fs, root = filesystem(url, storage)
        if _nearest_existing(fs, root) is None:
            raise ConfigError(f"output.url: cannot write under {url}: its bucket does not exist (runs never create buckets)")
        if not write_probe:
            return
        probe = join(root, RUNS_DIR, f".write-check-{secrets.token_hex(4)}")
        fs.makedirs(join(root, RUNS_DIR), exist_ok=True)
        with fs.open(probe, "wb") as handle:
            handle.write(b"ok")
        fs.rm(probe)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"output.url: cannot write under {url}: {describe_storage_error(exc, url, storage)}") from None


def _nearest_existing(fs, path: str) -> str | None:
    """The path or its closest existing ancestor: a run creates the rest, but not a bucket."""
    while not fs.exists(path):
        parent = posixpath.dirname(path.rstrip("/"))
        if not parent or parent == path:
            return None
        path = parent
    return path


def _check_prompts(job: JobConfig, model: ModelSource) -> None:
    """Render every job-level prompt through the checkpoint's own chat template before starting."""
    processor = load_processor(local_model_dir(model, files="processor"), job.model)
    builder = InputBuilder(processor)
    for prompt in prompts_for(job.tasks, list(job.tasks.vqa.questions) if job.tasks.vqa else []):
        builder.render(prompt.instruction)


def _load_vocabulary(job: JobConfig, storage: StorageConfig) -> frozenset[str] | None:
    if job.tasks.tags is None or job.tasks.tags.vocabulary is None:
        return None
    url = job.tasks.tags.vocabulary
    try:
        fs, path = filesystem(url, storage)
        with fs.open(path, "rb") as handle:
            text = handle.read().decode("utf-8")
    except Exception as exc:
        raise ConfigError(f"tasks.tags.vocabulary: {describe_storage_error(exc, url, storage)}") from None
    vocabulary = parse_vocabulary(text)
    if not vocabulary:
        raise ConfigError(f"tasks.tags.vocabulary: {url} holds no tags")
    return vocabulary


def _settings_json(job: JobConfig) -> str:
    settings = {
        "model": job.model.model_dump(include={"source", "revision", "dtype", "attn_implementation"}),
        "chat_template_override": job.model.chat_template is not None,
        "tasks": job.tasks.model_dump(exclude_none=True),
        "generation": job.generation.model_dump(exclude_none=True),
        "max_image_pixels": job.decode.max_image_pixels,
        "image_extensions": job.input.image_extensions,
    }
    return json.dumps(settings, sort_keys=True)


def connect_ray(job: JobConfig) -> bool:
    """Join the configured cluster or start a local one; True when this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": {"TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}}
    address = job.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        log.info("starting a local Ray")
        ray.init(
            num_cpus=job.ray.num_cpus,
            num_gpus=job.ray.num_gpus,
            object_store_memory=job.ray.object_store_memory_mb * 1024 * 1024 if job.ray.object_store_memory_mb else None,
            include_dashboard=False,
            runtime_env=runtime_env,
            log_to_driver=True,
        )
    return True


def _actor_pool(concurrency: int | tuple[int, int], max_tasks_in_flight: int | None = None):
    from ray.data import ActorPoolStrategy

    if isinstance(concurrency, int):
        return ActorPoolStrategy(size=concurrency, max_tasks_in_flight_per_actor=max_tasks_in_flight)
    low, high = concurrency
    return ActorPoolStrategy(min_size=low, max_size=high, max_tasks_in_flight_per_actor=max_tasks_in_flight)


def build_dataset(plan: Plan):
    import ray.data

    job = plan.job
    stages = job.stages
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = job.ray.progress_bars

    dataset = ray.data.read_datasource(
        WebDatasetShards(
            ReadSpec(
                shards=tuple(plan.shards),
                storage=plan.input_storage,
                image_extensions=tuple(job.input.image_extensions),
                metadata_extension=job.input.metadata_extension,
                rows_per_block=stages.read.rows_per_block,
            )
        ),
        override_num_blocks=len(plan.shards),
        concurrency=stages.read.concurrency,
        num_cpus=stages.read.num_cpus,
    )
    dataset = dataset.map_batches(
        PrepareStage,
        fn_constructor_kwargs={
            "spec": PrepareSpec(
                model=plan.model,
                model_config=job.model,
                tasks=job.tasks,
                max_image_pixels=job.decode.max_image_pixels,
            )
        },
        batch_format="pyarrow",
        batch_size=stages.prepare.batch_size,
        compute=_actor_pool(stages.prepare.concurrency),
        num_cpus=stages.prepare.num_cpus,
        udf_modifying_row_count=False,
    )
    dataset = dataset.map_batches(
        GenerateStage,
        fn_constructor_kwargs={
            "spec": GenerateSpec(
                model=plan.model,
                model_config=job.model,
                generation=job.generation,
                tasks=job.tasks,
                vocabulary=plan.vocabulary,
                batch_size=stages.model.batch_size,
            )
        },
        batch_format="pyarrow",
        batch_size=stages.model.batch_size,
        compute=_actor_pool(stages.model.concurrency, stages.model.max_tasks_in_flight_per_actor),
        num_gpus=stages.model.num_gpus or None,
        num_cpus=stages.model.num_cpus,
        udf_modifying_row_count=False,
    )
    return dataset


def run_job(job: JobConfig, *, echo=print) -> RunResult:
    """Plan, run and summarise a job. Raises ConfigError before any work when the job cannot run."""
    started_at = datetime.now(timezone.utc)
    stats = RunStats()
    plan = plan_job(job)
    echo(
        f"run {plan.run_id}: {len(plan.shards)} shard(s) -> {job.output.url} with {job.model.source} "
        f"({', '.join(plan.tasks)})"
    )
    fs, root = filesystem(job.output.url, plan.output_storage)
    committer = ShardCommitter(
        fs=fs,
        root=root,
        shards=plan.shards,
        schema=load_schema(),
        constants={"model": job.model.source, "settings": plan.settings, "run_id": plan.run_id},
        run_id=plan.run_id,
        compression=job.output.compression,
    )

    started_ray = connect_ray(job)
    status, error, exit_code = "completed", None, 0
    try:
        progress = _Progress(echo, len(plan.shards))
        for batch in build_dataset(plan).iter_batches(batch_format="pyarrow", batch_size=None):
            stats.observe(batch)
            committer.add(batch)
            progress.maybe_report(stats, committer)
        leftovers = committer.unfinished()
        if leftovers:
            raise PipelineError(
                f"{len(leftovers)} shard(s) never completed, e.g. {leftovers[0].shard.url} "
                f"({leftovers[0].received} of {leftovers[0].expected} rows)"
            )
    except KeyboardInterrupt:
        status, error, exit_code = "interrupted", "interrupted by the user", 130
    except Exception as exc:
        status, error, exit_code = "failed", _describe_run_error(exc), 1
        log.debug("run failed", exc_info=True)
    finally:
        committer.cleanup_staging()
        if started_ray:
            import ray

            ray.shutdown()

    summary = build_summary(
        job_name=job.name,
        run_id=plan.run_id,
        started_at=started_at,
        stats=stats,
        shards=list(committer.results.values()),
        output_url=job.output.url,
        model=job.model.source,
        tasks=plan.tasks,
        status=status,
        error=error,
    )
    summary_url = _write_summary(fs, root, job.output.url, plan.run_id, summary)
    echo(render_summary(summary, summary_url))
    return RunResult(summary=summary, summary_url=summary_url, exit_code=exit_code)


_EXCEPTION_LINE = re.compile(r"^(?!ray\.)[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)\b.*")


def _describe_run_error(exc: BaseException) -> str:
    """The stage's own exception line, dug out of Ray's wrappers (which embed it in a traceback text)."""
    if isinstance(exc, PipelineError):
        return str(exc)
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for error in chain:
        lines = [line.strip() for line in str(error).splitlines()]
        found = [line for line in lines if _EXCEPTION_LINE.match(line)]
        if found:
            return found[-1][:500]
    return f"{type(exc).__name__}: {str(exc).strip()[:500]}"


def _write_summary(fs, root: str, url: str, run_id: str, summary: dict[str, object]) -> str | None:
    path = join(root, RUNS_DIR, f"{run_id}.json")
    try:
        fs.makedirs(join(root, RUNS_DIR), exist_ok=True)
        with fs.open(path, "wb") as handle:
            handle.write(summary_json(summary).encode())
    except Exception as exc:
        log.error("could not write the run summary to %s: %s", path, describe_storage_error(exc, url))
        return None
    return join(url, RUNS_DIR, f"{run_id}.json")


class _Progress:
    """A line every few seconds for logs without a terminal; Ray's bars cover the interactive case."""

    def __init__(self, echo, total_shards: int):
        self.echo = echo
        self.total = total_shards
        self.last = time.monotonic()

    def maybe_report(self, stats: RunStats, committer: ShardCommitter) -> None:
        now = time.monotonic()
        if now - self.last < _PROGRESS_EVERY_SECONDS:
            return
        self.last = now
        done = sum(1 for r in committer.results.values() if r.finished)
        rate = stats.samples / stats.elapsed if stats.elapsed > 0 else 0.0
        self.echo(
            f"progress: {done}/{self.total} shards done, {stats.samples} samples "
            f"({stats.failed} failed), {rate:.1f} images/s, {stats.elapsed:.0f} s elapsed"
        )

