"""Everything checked before a run starts, and the plan the run follows.

`plan_job` needs no Ray: it lists the shards, checks the output location, finds the checkpoint,
loads its processor and renders every prompt through its chat template, and reads the tag
vocabulary. A ConfigError from here means nothing was started or written. `check_cluster_fits`
runs once a cluster is joined, before any stage starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import JobConfig, StorageConfig
from pipeline.errors import ConfigError
from pipeline.model_source import ModelSource, local_model_dir
from pipeline.modeling import InputBuilder, load_processor
from pipeline.prompts import TASK_ORDER, parse_vocabulary, prompts_for
from pipeline.retry import RetryPolicy, with_retries
from pipeline.shards import Shard, expand_shards
from pipeline.storage import describe_storage_error, filesystem, join, resolve_storage
from pipeline.writer import DONE_DIR, RUNS_DIR

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    job: JobConfig
    run_id: str
    shards: list[Shard]  # the shards this run processes
    input_storage: StorageConfig
    output_storage: StorageConfig
    model: ModelSource
    vocabulary: frozenset[str] | None
    settings: str
    skipped: list[Shard] = field(default_factory=list)  # committed by an earlier run
    # retry-failed: per shard URL, the keys of the samples to process again
    selection: dict[str, frozenset[str]] | None = None

    @property
    def settings_digest(self) -> str:
        return hashlib.sha256(self.settings.encode()).hexdigest()

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy.from_config(self.job.retries)

    @property
    def tasks(self) -> list[str]:
        return [t for t in TASK_ORDER if getattr(self.job.tasks, t) is not None]


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def plan_job(job: JobConfig, *, run_id: str | None = None, read_only: bool = False) -> Plan:
    """Every check that needs no Ray; a ConfigError here means nothing was started or written.

    `read_only` (for `validate`) checks that the output location exists instead of writing a probe.
    """
    sources = _Sources.of(job)
    shards = with_retries(
        lambda: expand_shards(job.input.urls, sources.input_storage), sources.policy, "listing input.urls"
    )
    skipped: list[Shard] = []
    if job.output.mode == "resume":
        done = committed_markers(job.output.url, sources.output_storage, sources.policy)
        skipped = [s for s in shards if s.name in done]
        shards = [s for s in shards if s.name not in done]
        if skipped:
            log.info("%d of %d shard(s) already committed; skipping them", len(skipped), len(skipped) + len(shards))
    return sources.plan(run_id, shards, write_probe=not read_only, skipped=skipped)


def plan_retry_failed(job: JobConfig, reasons: frozenset[str] | None = None, *, run_id: str | None = None) -> Plan:
    """A plan over the committed error rows (of `reasons`, or all): their samples are read again from
    their shards, and the committer replaces just those rows in each shard's file."""
    sources = _Sources.of(job)
    fs, root = filesystem(job.output.url, sources.output_storage)
    shards: list[Shard] = []
    selection: dict[str, frozenset[str]] = {}
    for name in sorted(committed_markers(job.output.url, sources.output_storage, sources.policy)):
        marker, failed = with_retries(
            lambda name=name: _failed_keys(fs, root, name, reasons), sources.policy, f"reading {name}'s output"
        )
        if failed:
            shards.append(Shard(url=marker["shard"], name=name))
            selection[marker["shard"]] = frozenset(failed)
    return sources.plan(run_id, shards, write_probe=True, selection=selection)


@dataclass(frozen=True)
class _Sources:
    """Where a job reads, writes and loads from, resolved once per plan."""

    job: JobConfig
    input_storage: StorageConfig
    output_storage: StorageConfig
    model: ModelSource
    policy: RetryPolicy

    @classmethod
    def of(cls, job: JobConfig) -> "_Sources":
        return cls(
            job=job,
            input_storage=resolve_storage(job.storage_for("input")),
            output_storage=resolve_storage(job.storage_for("output")),
            model=ModelSource.from_config(job.model, resolve_storage(job.storage_for("model"))),
            policy=RetryPolicy.from_config(job.retries),
        )

    def plan(self, run_id: str | None, shards: list[Shard], *, write_probe: bool, **extra) -> Plan:
        """The plan over `shards`, after the output, model and vocabulary checks. With no shards there
        is nothing to do, and neither the model nor the output is touched (a finished job's rerun
        writes nothing and loads no model)."""
        job = self.job
        vocabulary = None
        if shards:
            _check_output(job.output.url, self.output_storage, write_probe=write_probe)
            _check_prompts(job, self.model)  # also finds the checkpoint: a missing one is a ConfigError here
            vocabulary = _load_vocabulary(job, self.input_storage)
        return Plan(
            job=job,
            run_id=run_id or new_run_id(),
            shards=shards,
            input_storage=self.input_storage,
            output_storage=self.output_storage,
            model=self.model,
            vocabulary=vocabulary,
            settings=_settings_json(job),
            **extra,
        )


def _failed_keys(fs, root: str, name: str, reasons: frozenset[str] | None) -> tuple[dict[str, object], list[str]]:
    with fs.open(join(root, DONE_DIR, f"{name}.json"), "rb") as handle:
        marker = json.loads(handle.read())
    with fs.open(join(root, f"{name}.parquet"), "rb") as handle:
        table = pq.read_table(handle, columns=["key", "error_reason"])
    failed = table.filter(pc.is_valid(table.column("error_reason")))
    if reasons is not None:
        failed = failed.filter(pc.is_in(failed.column("error_reason"), value_set=pa.array(sorted(reasons))))
    return marker, failed.column("key").to_pylist()


def committed_markers(url: str, storage: StorageConfig, policy: RetryPolicy) -> dict[str, str]:
    """Completion markers under an output prefix, by shard output name (one recursive listing)."""
    fs, root = filesystem(url, storage)
    base = join(root, DONE_DIR)

    def listing() -> list[str]:
        try:
            return list(fs.find(base))
        except FileNotFoundError:
            return []

    try:
        paths = with_retries(listing, policy, f"listing {url}{DONE_DIR}/")
    except Exception as exc:
        raise ConfigError(f"output.url: cannot list {url}: {describe_storage_error(exc, url, storage)}") from None
    prefix = fs._strip_protocol(base).rstrip("/") + "/"
    found = {}
    for path in paths:
        path = fs._strip_protocol(path)
        if path.startswith(prefix) and path.endswith(".json"):
            found[path[len(prefix) : -len(".json")]] = path
    return found


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
