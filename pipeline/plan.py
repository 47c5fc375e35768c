"""Everything checked before a run starts, and the plan the run follows.

`plan_job` needs no Ray: it lists the shards, checks the output location, finds the checkpoint,
loads its processor and renders every prompt through its chat template, and reads the tag
vocabulary, cheapest checks first (transformers is imported only once the shards and the output
are known to be there). A ConfigError from here means nothing was started or written.

The processor checks cost seconds of CPU, mostly importing torch and transformers. A run
(`background_checks`) does them in a process of their own while it starts Ray, and waits for them
(`Plan.confirm_checks`) before it starts any stage or writes anything: a bad prompt still stops the run
before any work, without making every good run wait for the import and Ray's start one after the other.
A check that passed on this node for the same processor files, chat template, prompts and libraries is
remembered in the model's `cache_dir` (`processor_checks.CheckMemory`) and not run again: a nightly job
starts without the import.
In a process, the import neither holds the driver's interpreter lock while Ray starts nor stays loaded in
the driver (hundreds of MiB, and seconds of interpreter teardown at exit). `check_cluster_fits` runs once
a cluster is joined, before any stage starts.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import secrets
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import integrity, processor_checks
from pipeline.config import JobConfig, StorageConfig
from pipeline.errors import ConfigError
from pipeline.layout import OutputLayout
from pipeline.model_source import ModelSource, local_model_dir
from pipeline.prompts import TASK_ORDER, parse_vocabulary, prompts_for
from pipeline.retry import with_retries
from pipeline.shards import Shard, expand_shards
from pipeline.storage import describe_storage_error, filesystem, resolve_storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    job: JobConfig
    run_id: str
    shards: list[Shard]  # the shards this run processes
    input_storage: StorageConfig
    output: OutputLayout
    model: ModelSource
    vocabulary: frozenset[str] | None
    settings: str
    skipped: list[Shard] = field(default_factory=list)  # committed by an earlier run
    # resume: shards whose marker vouched for a file that is gone or changed, redone here; URL -> why
    repaired: dict[str, str] = field(default_factory=dict)
    # retry-failed: per shard URL, the keys of the samples to process again
    selection: dict[str, frozenset[str]] | None = None
    # the processor checks, perhaps still running in their own process (`background_checks`); None: no shards
    pending_checks: processor_checks.RunningChecks | None = field(default=None, repr=False, compare=False)

    def confirm_checks(self) -> None:
        """Wait for the processor checks started with the plan; their ConfigError, if any, is raised here."""
        if self.pending_checks is not None:
            self.pending_checks.result()

    @contextmanager
    def checks_settled(self) -> Iterator[None]:
        """Checks still under way when the block ends unconfirmed (Ray would not start, the cluster does not fit,
        Ctrl-C) are stopped then, not left running behind the command."""
        try:
            yield
        finally:
            if self.pending_checks is not None:
                self.pending_checks.abandon()

    @property
    def settings_digest(self) -> str:
        return hashlib.sha256(self.settings.encode()).hexdigest()

    @property
    def tasks(self) -> list[str]:
        return [t for t in TASK_ORDER if getattr(self.job.tasks, t) is not None]


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def plan_job(
    job: JobConfig, *, run_id: str | None = None, read_only: bool = False, background_checks: bool = False
) -> Plan:
    """Every check that needs no Ray; a ConfigError here means nothing was started or written.

    `read_only` (for `validate`) checks that the output location exists instead of writing a probe.
    `background_checks`: the processor checks go on in a process of their own; the run confirms them before any
    work.
    """
    sources = _Sources.of(job)
    shards = with_retries(
        lambda: expand_shards(job.input.urls, sources.input_storage), job.retries, "listing input.urls"
    )
    skipped: list[Shard] = []
    repaired: dict[str, str] = {}
    if job.output.mode == "resume":
        objects = sources.output.objects()  # one listing: the markers and the data files they vouch for
        done = {name for name in map(sources.output.marker_name, objects) if name is not None}
        broken = _broken_commits(sources.output, objects, [s.name for s in shards if s.name in done])
        skipped = [s for s in shards if s.name in done and s.name not in broken]
        repaired = {s.url: broken[s.name] for s in shards if s.name in broken}
        shards = [s for s in shards if s.name not in done or s.name in broken]
        if skipped:
            log.info("%d of %d shard(s) already committed; skipping them", len(skipped), len(skipped) + len(shards))
        for url, reason in repaired.items():
            log.warning("%s is marked done but %s: redoing it", url, reason)
    return sources.plan(
        run_id,
        shards,
        write_probe=not read_only,
        background_checks=background_checks,
        skipped=skipped,
        repaired=repaired,
    )


def _broken_commits(output: OutputLayout, objects: dict[str, dict[str, object]], names: list[str]) -> dict[str, str]:
    """The committed shards (`names`) whose marker does not match their data file in the prefix's listing
    (`objects`), with why. Each marker is read (in parallel); no data file is, except the Parquet footer of a
    file whose marker predates recorded sizes (its row count is all such a marker has to compare).
    """
    listed = {name: info for rel, info in objects.items() if (name := output.data_name(rel)) is not None}
    broken = {}
    for name, marker in output.read_markers(names).items():
        reason = integrity.listing_mismatch(marker, listed.get(name))
        if reason is None and not integrity.is_fully_checkable(marker) and isinstance(marker.get("rows"), int):
            rows = output.data_rows(name)
            if rows != marker["rows"]:
                reason = f"its data file has {rows} rows, the marker recorded {marker['rows']}"
        if reason is not None:
            broken[name] = reason
    return broken


def plan_retry_failed(
    job: JobConfig,
    reasons: frozenset[str] | None = None,
    *,
    run_id: str | None = None,
    background_checks: bool = False,
) -> Plan:
    """A plan over the committed error rows (of `reasons`, or all): their samples are read again from
    their shards, and the committer replaces just those rows in each shard's file."""
    sources = _Sources.of(job)
    shards: list[Shard] = []
    selection: dict[str, frozenset[str]] = {}
    for name in sorted(sources.output.committed()):
        marker = sources.output.read_marker(name)
        failed = _failed_keys(sources.output, name, reasons)
        if failed:
            shards.append(Shard(url=marker["shard"], name=name))
            selection[marker["shard"]] = frozenset(failed)
    return sources.plan(run_id, shards, write_probe=True, background_checks=background_checks, selection=selection)


@dataclass(frozen=True)
class _Sources:
    """Where a job reads, writes and loads from, resolved once per plan."""

    job: JobConfig
    input_storage: StorageConfig
    model: ModelSource
    output: OutputLayout

    @classmethod
    def of(cls, job: JobConfig) -> "_Sources":
        return cls(
            job=job,
            input_storage=resolve_storage(job.storage_for("input")),
            model=ModelSource.from_config(job.model, resolve_storage(job.storage_for("model"))),
            output=OutputLayout(job.output.url, resolve_storage(job.storage_for("output")), job.retries),
        )

    def plan(
        self, run_id: str | None, shards: list[Shard], *, write_probe: bool, background_checks: bool, **extra
    ) -> Plan:
        """The plan over `shards`, after the output, model and vocabulary checks. With no shards there
        is nothing to do, and neither the model nor the output is touched (a finished job's rerun
        writes nothing and loads no model)."""
        job = self.job
        vocabulary = None
        pending = None
        if shards:
            self.output.check_writable(write_probe=write_probe)
            # Every checkpoint is found now (a missing one is a ConfigError here); their processors load after.
            loads = [check for check in (_prompt_check(job, self.model), _embed_model_check(job)) if check]
            vocabulary = _load_vocabulary(job, self.input_storage)
            memory = processor_checks.CheckMemory.under(self.model.cache_dir)
            pending = (processor_checks.start if background_checks else processor_checks.run_here)(loads, memory)
        return Plan(
            job=job,
            run_id=run_id or new_run_id(),
            shards=shards,
            input_storage=self.input_storage,
            output=self.output,
            model=self.model,
            vocabulary=vocabulary,
            settings=_settings_json(job),
            pending_checks=pending,
            **extra,
        )


def _failed_keys(output: OutputLayout, name: str, reasons: frozenset[str] | None) -> list[str]:
    try:
        table = output.read_data(name, columns=["key", "error_reason"])
    except FileNotFoundError:
        raise ConfigError(
            f"{output.url.rstrip('/')}/{name}.parquet is marked done but missing: run `llava-pipeline run` on the job "
            "first (a resume redoes it), then retry its failed rows"
        ) from None
    failed = table.filter(pc.is_valid(table.column("error_reason")))
    if reasons is not None:
        failed = failed.filter(pc.is_in(failed.column("error_reason"), value_set=pa.array(sorted(reasons))))
    return failed.column("key").to_pylist()


def _prompt_check(job: JobConfig, model: ModelSource) -> Callable[[], object]:
    """Finds the checkpoint's processor files now; what it returns (picklable, for the checks' process) renders
    every job-level prompt through the checkpoint's own chat template."""
    from pipeline.inputs import render_every_prompt

    directory = local_model_dir(model, files="processor")
    instructions = [
        p.instruction for p in prompts_for(job.tasks, list(job.tasks.vqa.questions) if job.tasks.vqa else [])
    ]
    return functools.partial(render_every_prompt, directory, job.model, instructions)


def _embed_model_check(job: JobConfig) -> Callable[[], object] | None:
    """Finds the embedding checkpoints now (`embed:`); what it returns loads their processor files."""
    if job.embed is None:
        return None  # without importing the stages, and Ray Data with them, before the checks' process starts
    from pipeline.stages.embed import check_embed_models

    return check_embed_models(job)


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
    if job.embed is not None:  # only then: a job without embeddings keeps its settings (and their digest)
        settings["embed"] = {
            name: model.model_dump(include={"source", "revision", "dtype"})
            for name in ("image_text_model", "text_model")
            if (model := getattr(job.embed, name)) is not None
        }
    return json.dumps(settings, sort_keys=True)


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
    if job.embed is not None and stages.embed.num_gpus > 0 and gpus < stages.embed.num_gpus:
        problems.append(
            f"stages.embed.num_gpus is {stages.embed.num_gpus:g} per embed actor but the cluster has {gpus:g} "
            "GPU(s); set stages.embed.num_gpus: 0 to embed on CPU, or join a cluster with GPUs"
        )
    sections = job.stage_sections()
    needed = sum(section.min_cpus for section in sections.values())
    cpus = resources.get("CPU", 0.0)
    if needed > cpus:
        problems.append(
            f"the stages need {needed:g} CPUs to run at once (a task of each task stage, the minimum pool of each "
            f"actor stage: {', '.join(sections)}) "
            f"but the cluster has {cpus:g}; lower stages.*.num_cpus or, on a local Ray, raise ray.num_cpus "
            "(logical CPUs may exceed cores)"
        )
    if not problems:
        return
    if local:
        raise ConfigError("the job does not fit the local Ray: " + "; and ".join(problems))
    for problem in problems:
        log.warning("%s; waiting for the cluster to grow", problem)
