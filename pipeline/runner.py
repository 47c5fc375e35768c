"""Running a job: plan it (see `pipeline.plan`), then stream its shards through Ray Data.

`run_plan` joins or starts a Ray cluster and builds the dataset from the declared stages
(`pipeline.stages.STAGES`: read tasks -> prepare actors (CPU) -> model actors (GPU) -> parse
tasks), then drives it: the driver commits one Parquet file per finished shard through the output
layout, keeps the run's counters and writes the summary.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterator, Sequence

import ray
import ray.data

from pipeline import faults, metrics, rows
from pipeline.actors import ActorSampler, actor_stages
from pipeline.config import JobConfig
from pipeline.environment import variables_set
from pipeline.errors import PipelineError
from pipeline.layout import OutputLayout
from pipeline.lease import OutputLease, output_lease
from pipeline.plan import Plan, check_cluster_fits, new_run_id, plan_job, plan_retry_failed
from pipeline.retry import error_chain
from pipeline.schema import schema_for
from pipeline.stages import STAGES
from pipeline.stages.base import placed
from pipeline.stages.embed import embedding_columns
from pipeline.storage import describe_storage_error
from pipeline.summary import RunOutcome, RunStats, build_summary, render_summary, summary_json
from pipeline.writer import ShardCommitter, ShardResult

log = logging.getLogger(__name__)

_PROGRESS_EVERY_SECONDS = 10.0


@dataclass(frozen=True)
class RunResult:
    summary: dict[str, object]
    summary_url: str | None
    exit_code: int


def connect_ray(job: JobConfig) -> bool:
    """Join the configured cluster or start a local one; True when this call started Ray."""
    if ray.is_initialized():
        return False
    # What every worker's environment needs: quiet transformers logs, no tokenizer thread pools, and the driver's
    # fault plan (a drill; `pipeline.faults`).
    worker_env = {
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
        **faults.forwarded_environment(),
    }
    address = job.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env={"env_vars": worker_env}, log_to_driver=True)
        return True
    log.info("starting a local Ray")
    # A Ray started here gives its workers the environment of this process as it was at the start. Set for the
    # start only, the variables reach every worker without a job runtime_env, which would make Ray start fresh
    # workers for this job instead of handing it the ones it prestarted: about a second more before the first
    # read task and again before the model actor.
    with variables_set(worker_env):
        ray.init(
            address="local",  # a new one, even where another Ray runs on this machine (ray.init would join it)
            num_cpus=job.ray.num_cpus,
            num_gpus=job.ray.num_gpus,
            object_store_memory=job.ray.object_store_memory_mb * 1024 * 1024
            if job.ray.object_store_memory_mb
            else None,
            include_dashboard=False,
            log_to_driver=True,
        )
    return True


def build_dataset(plan: Plan, stages: Sequence = STAGES):
    """The run's dataset: each declared stage applied in turn, the read stage first."""
    ray.data.DataContext.get_current().enable_progress_bars = plan.job.ray.progress_bars
    metrics.label_dataset(plan.job.name, plan.run_id)
    dataset = None
    for stage in placed(stages, plan.job):
        dataset = stage.add_to(dataset, plan)
        if dataset.context.target_max_block_size != _block_bytes(plan.job):
            # Set on the source's dataset, which every later stage's dataset copies: this job's blocks only.
            dataset.context.target_max_block_size = _block_bytes(plan.job)
    return dataset


def blocks_as_they_come(dataset) -> Iterator:
    """The dataset's output blocks (Arrow tables), each handed over as soon as it exists.

    `prefetch_batches=0`: with Ray Data's default of 1 and no batch size, the iterator holds each block back
    until the next one is produced, so the driver would see every shard's rows one model call late (the first
    row, the first commit, each commit after it)."""
    return dataset.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0)


def _block_bytes(job: JobConfig) -> int:
    return int(job.ray.target_max_block_mb * 1024 * 1024)


@contextmanager
def ray_cluster(job: JobConfig) -> Iterator[None]:
    """The job's cluster, checked to fit the job; a local Ray started here is shut down after."""
    started = connect_ray(job)
    try:
        check_cluster_fits(job, ray.cluster_resources(), local=started)
        yield
    finally:
        if started:
            ray.shutdown()


def _stream(
    plan: Plan, committer: ShardCommitter, stats: RunStats, echo, stages: Sequence
) -> tuple[str, str | None, int]:
    """Drive the dataset to the end, committing shards as they complete; (status, error, exit code).

    When Ray loses part of the cluster under the run (a node, an actor, objects it held), the stream
    starts again over the shards not yet committed, up to `retries.stream_restarts` times. Rows the
    committer already holds stay; rows delivered again are dropped by the committer.
    """
    progress = _Progress(echo, len(plan.shards))
    live = metrics.DriverMetrics(plan.job.name, plan.run_id)
    restarts = 0

    def committed(results: list) -> None:
        """Shards whose commit (on the committer's threads) finished: into the counters and the live metrics."""
        stats.observe_commits(results)
        for result in results:
            live.shard_finished(result.status)

    try:
        while True:
            pending = [r.shard for r in committer.unfinished()]
            try:
                dataset = build_dataset(dataclasses.replace(plan, shards=pending), stages)
                for batch in blocks_as_they_come(dataset):
                    faults.inject("driver.rows")
                    arrived = time.perf_counter()
                    admitted = committer.admit(batch)
                    stats.observe(admitted)  # counted once, however often a row was delivered
                    live.observe(admitted, stats)
                    committed(committer.commit_ready())
                    stats.driver_seconds += time.perf_counter() - arrived
                    progress.maybe_report(stats, committer)
                committed(committer.drain())
                break
            except Exception as exc:
                if restarts >= plan.job.retries.stream_restarts or not is_cluster_fault(exc):
                    raise
                committed(committer.drain())  # what is left unfinished is what the restart reads again
                restarts += 1
                stats.stream_restarts = restarts
                log.warning(
                    "Ray lost part of the cluster (%s); restarting the stream over %d unfinished shard(s), "
                    "restart %d of %d",
                    _describe_run_error(exc),
                    len(committer.unfinished()),
                    restarts,
                    plan.job.retries.stream_restarts,
                )
        leftovers = committer.unfinished()
        if leftovers:
            raise PipelineError(
                f"{len(leftovers)} shard(s) never completed, e.g. {leftovers[0].shard.url} "
                f"({leftovers[0].received} of {leftovers[0].expected} rows)"
            )
    except KeyboardInterrupt:
        return "interrupted", "interrupted by the user", 130
    except Exception as exc:
        log.debug("run failed", exc_info=True)
        return "failed", _describe_run_error(exc), 1
    finally:
        committer.close()
        committer.cleanup_staging()
    return "completed", None, 0


# Ray errors that mean the cluster lost something under the run, not that our code failed.
_CLUSTER_FAULTS = frozenset(
    {
        "ActorUnavailableError",
        "NodeDiedError",
        "ObjectLostError",
        "OwnerDiedError",
        "ObjectFetchTimedOutError",
        "ObjectReconstructionFailedError",
        "ObjectReconstructionFailedMaxAttemptsExceededError",
        "ObjectReconstructionFailedLineageEvictedError",
        "WorkerCrashedError",
        "ActorDiedError",
    }
)


def is_cluster_fault(error: BaseException) -> bool:
    """True when the error chain shows lost nodes, workers or objects. An actor that died in its
    constructor (a model that cannot load) is not one: restarting would fail the same way."""
    return any(
        type(link).__name__ in _CLUSTER_FAULTS and "creation task" not in str(link) for link in error_chain(error)
    )


def run_job(job: JobConfig, *, echo=print, force_unlock: bool = False, stages: Sequence = STAGES) -> RunResult:
    """Plan, run and summarise a job, holding the output's lease from before planning to the end. Raises
    ConfigError before any work when the job cannot run, LeaseHeld when another run writes the output.

    `stages`: the declared stages (`pipeline.stages.STAGES`); the capacity benchmark swaps the model stage."""
    with output_lease(job, run_id=new_run_id(), command="run", force_unlock=force_unlock) as lease:
        plan = plan_job(job, run_id=lease.run_id, background_checks=True)
        return run_plan(plan, echo=echo, lease=lease, stages=stages)


def retry_failed(
    job: JobConfig, *, reasons: frozenset[str] | None = None, echo=print, force_unlock: bool = False
) -> RunResult:
    """Run again only the samples committed as error rows (of `reasons`, or all), replacing their rows."""
    with output_lease(job, run_id=new_run_id(), command="retry-failed", force_unlock=force_unlock) as lease:
        plan = plan_retry_failed(job, reasons, run_id=lease.run_id, background_checks=True)
        return run_plan(plan, echo=echo, command="retry-failed", lease=lease)


def run_plan(
    plan: Plan,
    *,
    echo=print,
    command: str = "run",
    lease: OutputLease | None = None,
    stages: Sequence = STAGES,
) -> RunResult:
    """Run a plan under the output's lease: `lease` when the caller took it before planning (so the plan
    saw the prefix as no other run was changing it), else one taken here."""
    if lease is None and plan.shards:
        with output_lease(plan.job, run_id=plan.run_id, command=command) as lease:
            result = _run_leased(plan, echo, command, lease, stages)
    else:
        result = _run_leased(plan, echo, command, lease, stages)
    if plan.job.index.update_after_run and result.exit_code != 130:  # the index takes what the run committed
        from pipeline.index import update_after_run

        update_after_run(plan.job, echo)
    return result


def _run_leased(plan: Plan, echo, command: str, lease: OutputLease | None, stages: Sequence) -> RunResult:
    job = plan.job
    if not plan.shards:
        echo(
            f"nothing to do: all {len(plan.skipped)} shard(s) under {job.output.url} are already committed "
            "(output.mode: overwrite redoes them)"
            if command == "run"
            else f"nothing to retry: no committed row under {job.output.url} has a matching error"
        )
        return RunResult(
            summary={"status": "nothing_to_do", "skipped": len(plan.skipped)}, summary_url=None, exit_code=0
        )
    started_at = datetime.now(timezone.utc)
    stats = RunStats()
    with plan.checks_settled(), ray_cluster(job):
        # The plan's processor checks went on while Ray started: a bad prompt stops the run here, before any work.
        plan.confirm_checks()
        what = (
            f"{sum(len(k) for k in plan.selection.values())} failed sample(s) in {len(plan.shards)} shard(s)"
            if plan.selection is not None
            else f"{len(plan.shards)} shard(s)" + _resume_note(plan)
        )
        echo(f"{command} {plan.run_id}: {what} -> {job.output.url} with {job.model.source} ({', '.join(plan.tasks)})")
        committer = ShardCommitter(
            layout=plan.output,
            shards=plan.shards,
            schema=schema_for(embedding_columns(job)),
            constants={"model": job.model.source, "settings": plan.settings, "run_id": plan.run_id},
            run_id=plan.run_id,
            compression=job.output.compression,
            settings_digest=plan.settings_digest,
            patch=plan.selection is not None,
            commit_threads=job.output.commit_threads,
            guard=lease.assert_held if lease is not None else None,
            embedding_models=embedding_columns(job),
        )
        # Under the lease no other run is writing here: whatever is staged was left by killed runs.
        try:
            plan.output.discard(plan.output.staging_root(), recursive=True)
        except Exception as exc:  # hidden from readers; `verify` lists what is left
            log.warning("could not remove files killed runs left under %s: %s", plan.output.staging_root(), exc)

        with ActorSampler(actor_stages(job), started=stats.started) as actors:
            status, error, exit_code = _stream(plan, committer, stats, echo, stages)
    stats.actors = actors.series
    shards = list(committer.results.values())
    if status == "completed":
        breach = _failure_limits_breached(job, stats, shards)
        if breach:
            status, error, exit_code = "failed", breach, 1

    summary = build_summary(
        RunOutcome(
            plan=plan,
            command=command,
            started_at=started_at,
            stats=stats,
            shards=shards,
            duplicates_dropped=committer.duplicates,
            status=status,
            error=error,
        )
    )
    summary["report_url"] = _write_report(plan.output, plan.run_id, summary)
    summary_url = _write_summary(plan.output, plan.run_id, summary)
    echo(render_summary(summary, summary_url))
    return RunResult(summary=summary, summary_url=summary_url, exit_code=exit_code)


def _resume_note(plan: Plan) -> str:
    notes = [f"{len(plan.skipped)} already committed"] if plan.skipped else []
    if plan.repaired:
        notes.append(f"{len(plan.repaired)} to repair: marked done, but the file is missing or changed")
    return f" ({'; '.join(notes)})" if notes else ""


_EXCEPTION_LINE = re.compile(r"^(?!ray\.)[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)\b.*")


def _describe_run_error(exc: BaseException) -> str:
    """The stage's own exception line, dug out of Ray's wrappers (which embed it in a traceback text)."""
    if isinstance(exc, PipelineError):
        return str(exc)
    for error in error_chain(exc):
        lines = [line.strip() for line in str(error).splitlines()]
        found = [line for line in lines if _EXCEPTION_LINE.match(line)]
        if found:
            return found[-1][:500]
    return f"{type(exc).__name__}: {str(exc).strip()[:500]}"


def _failure_limits_breached(job: JobConfig, stats: RunStats, shards: list[ShardResult]) -> str | None:
    """Why a completed run still counts as failed, if it does (`failures.*`)."""
    limits = job.failures
    reasons = []
    broken = [r for r in shards if r.status in (rows.SHARD_FAILED, rows.SHARD_PARTIAL)]
    if limits.max_failed_shards is not None and len(broken) > limits.max_failed_shards:
        reasons.append(
            f"{len(broken)} shard(s) failed or ended early, more than failures.max_failed_shards="
            f"{limits.max_failed_shards} (e.g. {broken[0].shard.url}: {broken[0].error})"
        )
    fraction = stats.failed / stats.samples if stats.samples else 0.0
    if limits.max_failed_sample_fraction is not None and fraction > limits.max_failed_sample_fraction:
        top = ", ".join(f"{n} {reason}" for reason, n in stats.failed_by_reason.most_common(3))
        reasons.append(
            f"{stats.failed} of {stats.samples} samples failed ({fraction:.1%}), more than "
            f"failures.max_failed_sample_fraction={limits.max_failed_sample_fraction:g} ({top})"
        )
    return "; and ".join(reasons) or None


def _write_report(output: OutputLayout, run_id: str, summary: dict[str, object]) -> str | None:
    from pipeline.report import render_report

    return _write_run_file(
        output, "report", output.report_url(run_id), lambda: output.write_report(run_id, render_report(summary))
    )


def _write_summary(output: OutputLayout, run_id: str, summary: dict[str, object]) -> str | None:
    return _write_run_file(
        output, "summary", output.summary_url(run_id), lambda: output.write_summary(run_id, summary_json(summary))
    )


def _write_run_file(output: OutputLayout, what: str, url: str, write) -> str | None:
    """A run's summary or report: a failure to write it is logged, never turned into a failed run."""
    try:
        return write()
    except Exception as exc:
        log.error(
            "could not write the run %s to %s: %s", what, url, describe_storage_error(exc, output.url, output.storage)
        )
        return None


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
