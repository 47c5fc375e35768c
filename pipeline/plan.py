"""Everything checked before a run starts, and the plan the run follows.

`plan_job` needs no Ray: it lists the shards, checks the output location, finds the checkpoint,
loads its processor and renders every prompt through its chat template, and reads the tag
vocabulary. A ConfigError from here means nothing was started or written. `check_cluster_fits`
runs once a cluster is joined, before any stage starts.
"""

from __future__ import annotations

import json
import logging
import posixpath
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone

from pipeline.config import JobConfig, StorageConfig
from pipeline.errors import ConfigError
from pipeline.model_source import ModelSource, local_model_dir
from pipeline.modeling import InputBuilder, load_processor
from pipeline.prompts import TASK_ORDER, parse_vocabulary, prompts_for
from pipeline.shards import Shard, expand_shards
from pipeline.storage import describe_storage_error, filesystem, join, resolve_storage
from pipeline.writer import RUNS_DIR

log = logging.getLogger(__name__)


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


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def plan_job(job: JobConfig, *, run_id: str | None = None, read_only: bool = False) -> Plan:
    """Every check that needs no Ray; a ConfigError here means nothing was started or written.

    `read_only` (for `validate`) checks that the output location exists instead of writing a probe.
    """
    input_storage = resolve_storage(job.storage_for("input"))
    output_storage = resolve_storage(job.storage_for("output"))
    model = ModelSource.from_config(job.model, resolve_storage(job.storage_for("model")))

    shards = expand_shards(job.input.urls, input_storage)
    _check_output(job.output.url, output_storage, write_probe=not read_only)
    _check_prompts(job, model)  # also finds the checkpoint: a missing one is a ConfigError here
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
            raise ConfigError(
                f"output.url: cannot write under {url}: its bucket does not exist (runs never create buckets)"
            )
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
        raise ConfigError(
            f"output.url: cannot write under {url}: {describe_storage_error(exc, url, storage)}"
        ) from None


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


def _min_size(concurrency: int | tuple[int, int]) -> int:
    return concurrency if isinstance(concurrency, int) else concurrency[0]


def check_cluster_fits(job: JobConfig, resources: dict[str, float], *, local: bool) -> None:
    """Stop a job that could never start on this cluster: Ray Data would otherwise wait forever for
    actors it cannot place. A remote cluster may autoscale, so there it is only a warning."""
    stages = job.stages
    problems = []
    gpus = resources.get("GPU", 0.0)
    if stages.model.num_gpus > 0 and gpus < stages.model.num_gpus:
        problems.append(
            f"stages.model.num_gpus is {stages.model.num_gpus:g} per model actor but the cluster has {gpus:g} GPU(s); "
            "set stages.model.num_gpus: 0 to run the model on CPU, or join a cluster with GPUs"
        )
    needed = (
        stages.read.num_cpus
        + _min_size(stages.prepare.concurrency) * stages.prepare.num_cpus
        + _min_size(stages.model.concurrency) * stages.model.num_cpus
    )
    cpus = resources.get("CPU", 0.0)
    if needed > cpus:
        problems.append(
            f"the stages need {needed:g} CPUs to run at once (a read task, the minimum prepare and model actors) "
            f"but the cluster has {cpus:g}; lower stages.*.num_cpus or, on a local Ray, raise ray.num_cpus "
            "(logical CPUs may exceed cores)"
        )
    if not problems:
        return
    if local:
        raise ConfigError("the job does not fit the local Ray: " + "; and ".join(problems))
    for problem in problems:
        log.warning("%s; waiting for the cluster to grow", problem)
