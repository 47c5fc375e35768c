"""Run counters and the end-of-run summary.

Stages report through the rows themselves: every row carries its error reason and each stage's
share of busy time (`_seconds_<stage>`), and every shard ends with a `shard_end` row. The driver
folds each finished batch into `RunStats`, so the summary counts exactly what was written, with
no side channel that a retried task or a dead actor could double-count or lose.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import rows
from pipeline.accounting import Usage, cost_summary, render_usage, token_summary
from pipeline.actors import ActorSeries, render_actors
from pipeline.plan import Plan
from pipeline.writer import ShardResult


@dataclass
class RunStats:
    started: float = field(default_factory=time.monotonic)
    samples: int = 0
    succeeded: int = 0
    failed_by_reason: Counter = field(default_factory=Counter)
    stage_seconds: Counter = field(default_factory=Counter)
    first_row_seconds: float | None = None
    first_commit_seconds: float | None = None  # when the first shard's file and marker were in place
    driver_seconds: float = 0.0  # the driver's own time on arriving rows: admitting, counting, committing
    stream_restarts: int = 0
    # Steady state, on the model stage's own clock: a model call stamps all its rows with one `processed_at`,
    # so the rows tell when each call ended, how long it ran and how many samples it answered. Keyed by that
    # end (microseconds): [busy seconds, samples].
    model_calls: dict[int, list[float]] = field(default_factory=dict)
    # Accounting (pipeline.accounting): tokens and model-actor lifetimes, as the rows report them.
    usage: Usage = field(default_factory=Usage)
    # Samples committed so far, after each batch that brought some: (seconds since the start, samples).
    timeline: list[tuple[float, int]] = field(default_factory=list)
    # Each shard's busy seconds, every stage's share of its rows summed: which shards cost the most.
    shard_seconds: Counter = field(default_factory=Counter)
    # Actors per actor-pool stage over the run, sampled by the driver (`pipeline.actors`).
    actors: ActorSeries = field(default_factory=dict)

    def observe(self, table: pa.Table) -> None:
        for stage in rows.stages_timed(table):
            self.stage_seconds[stage] += pc.sum(table.column(rows.seconds_column(stage))).as_py() or 0.0
        self._observe_model_calls(table)
        self._observe_shard_seconds(table)
        self.usage.observe(table)
        samples = table.filter(pc.equal(table.column(rows.RECORD), rows.SAMPLE))
        if not samples.num_rows:
            return
        if self.first_row_seconds is None:
            self.first_row_seconds = time.monotonic() - self.started
        self.samples += samples.num_rows
        self.timeline.append((time.monotonic() - self.started, self.samples))
        self.succeeded += pc.sum(pc.is_null(samples.column("error"))).as_py() or 0
        reasons = samples.column("error_reason").drop_null()
        self.failed_by_reason.update(reasons.to_pylist())

    def _observe_shard_seconds(self, table: pa.Table) -> None:
        timed = [rows.seconds_column(stage) for stage in rows.stages_timed(table)]
        if not timed or not table.num_rows:
            return
        busy = table.column(timed[0]).fill_null(0.0)
        for name in timed[1:]:
            busy = pc.add(busy, table.column(name).fill_null(0.0))
        per_shard = (
            pa.table({"shard": table.column("shard"), "busy": busy}).group_by("shard").aggregate([("busy", "sum")])
        )
        for shard, seconds in zip(per_shard.column("shard").to_pylist(), per_shard.column("busy_sum").to_pylist()):
            self.shard_seconds[shard] += seconds or 0.0

    def recent_rate(self, window: float, now: float) -> float:
        """Samples per second over the last `window` seconds (since the start, early in the run)."""
        if not self.timeline:
            return 0.0
        elapsed = now - self.started
        since = max(0.0, elapsed - window)
        before = 0
        for seconds, samples in reversed(self.timeline):
            if seconds <= since:
                before = samples
                break
        span = elapsed - since
        return (self.samples - before) / span if span > 0 else 0.0

    def _observe_model_calls(self, table: pa.Table) -> None:
        seconds = rows.seconds_column("model")
        if "processed_at" not in table.column_names or seconds not in table.column_names:
            return
        # A batch holds a few model calls at most: plain lists beat an Arrow group-by (4 ms a batch) here.
        ends = table.column("processed_at").cast(pa.int64()).to_pylist()
        busy = table.column(seconds).to_pylist()
        records = table.column(rows.RECORD).to_pylist()
        for end, spent, record in zip(ends, busy, records):
            if end is not None:
                call = self.model_calls.setdefault(end, [0.0, 0])
                call[0] += spent or 0.0
                call[1] += record == rows.SAMPLE

    def observe_commits(self, committed: list) -> None:
        """Shards whose commits finished; the driver learns of them only at its next batch, so the first commit's
        time is the one its commit thread recorded."""
        times = [result.committed_at for result in committed if result.committed_at is not None]
        if times and self.first_commit_seconds is None:
            self.first_commit_seconds = min(times) - self.started

    @property
    def failed(self) -> int:
        return self.samples - self.succeeded

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


@dataclass
class RunOutcome:
    """Everything a run's summary is made of: the plan it followed and what happened."""

    plan: Plan
    command: str
    started_at: datetime
    stats: RunStats
    shards: list[ShardResult]
    duplicates_dropped: int
    status: str
    error: str | None = None


def build_summary(outcome: RunOutcome) -> dict[str, object]:
    stats, shards, job = outcome.stats, outcome.shards, outcome.plan.job
    wall = stats.elapsed
    by_status = Counter(r.status or "unfinished" for r in shards)
    stages = {}
    for stage in stats.stage_seconds:
        errors = {r: n for r, n in sorted(stats.failed_by_reason.items()) if rows.REASONS.get(r, ("?",))[0] == stage}
        stages[stage] = {"busy_seconds": round(stats.stage_seconds[stage], 3), "errors_by_reason": errors}
    return {
        "job": job.name,
        "run_id": outcome.plan.run_id,
        "command": outcome.command,
        "status": outcome.status,
        "error": outcome.error,
        "started_at": outcome.started_at.isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "wall_seconds": round(wall, 3),
        "model": job.model.source,
        "tasks": outcome.plan.tasks,
        "output": job.output.url,
        "samples": {
            "read": stats.samples,
            "succeeded": stats.succeeded,
            "failed": stats.failed,
            "failed_by_reason": dict(sorted(stats.failed_by_reason.items())),
        },
        "shards": {
            "total": len(shards),
            "ok": by_status.get(rows.SHARD_OK, 0),
            "partial": by_status.get(rows.SHARD_PARTIAL, 0),
            "failed": by_status.get(rows.SHARD_FAILED, 0),
            "unfinished": by_status.get("unfinished", 0),
            "skipped_already_committed": len(outcome.plan.skipped),
            "problems": [
                {"shard": r.shard.url, "status": r.status or "unfinished", "samples": r.expected, "error": r.error}
                for r in shards
                if r.status != rows.SHARD_OK
            ],
            "outputs": [r.output_path for r in shards if r.output_path],
            "rows_replaced": sum(r.rows_replaced for r in shards),
        },
        # resume: shards marked done whose committed file was missing or changed, redone by this run
        "repaired": [{"shard": url, "reason": reason} for url, reason in outcome.plan.repaired.items()],
        "duplicates_dropped": outcome.duplicates_dropped,
        "stream_restarts": stats.stream_restarts,
        "images_per_second": round(stats.samples / wall, 3) if wall > 0 else None,
        # how many processor checks this run ran, and how many passed before for the same files and prompts
        "processor_checks": (
            outcome.plan.pending_checks.as_summary()
            if outcome.plan.pending_checks is not None
            else {"ran": 0, "remembered": 0}
        ),
        "seconds_to_first_row": round(stats.first_row_seconds, 3) if stats.first_row_seconds is not None else None,
        "seconds_to_first_commit": (
            round(stats.first_commit_seconds, 3) if stats.first_commit_seconds is not None else None
        ),
        "driver": {
            "busy_seconds": round(stats.driver_seconds, 3),
            # What one driver could commit if rows arrived without pause: its capacity, not this run's rate.
            "rows_per_busy_second": round(stats.samples / stats.driver_seconds, 1) if stats.driver_seconds else None,
        },
        "stages": stages,
        "steady_state": _steady_state(stats),
        "tokens": token_summary(stats.usage, stats.samples),
        "cost": cost_summary(
            stats.usage,
            stats.samples,
            stats.stage_seconds.get("model", 0.0),
            job.stages.model.num_gpus,
            job.cost.gpu_hour_usd,
        ),
        "slowest_shards": [
            {"shard": shard, "busy_seconds": round(seconds, 3)}
            for shard, seconds in stats.shard_seconds.most_common(SLOWEST_SHARDS)
        ],
        "timeline": _timeline(stats),
        "actors": stats.actors,
        **_embeddings(job, shards),
    }


def _embeddings(job, shards: list[ShardResult]) -> dict[str, object]:
    """`embeddings`: per embedding column the job writes, its model and the dimension of the vectors this run
    committed (null when it committed none); absent for jobs without an `embed` section."""
    from pipeline.stages.embed import embedding_columns

    columns = embedding_columns(job)
    if not columns:
        return {}
    spaces: dict[str, dict[str, object]] = {}
    for column, model in columns.items():
        entry: dict[str, object] = {"model": model}
        if column != "clip_score":
            written = [r.embeddings[column].get("dimension") for r in shards if column in r.embeddings]
            entry["dimension"] = next((d for d in written if d is not None), None)
        spaces[column] = entry
    return {"embeddings": spaces}


# The run report's plots: at most this many points of committed samples over time, and this many shards.
TIMELINE_POINTS = 240
SLOWEST_SHARDS = 10


def _timeline(stats: RunStats) -> dict[str, list]:
    """Committed samples over the run's seconds, thinned to TIMELINE_POINTS (the last point always kept)."""
    points = stats.timeline
    if len(points) > TIMELINE_POINTS:
        step = len(points) / TIMELINE_POINTS
        points = [points[int(i * step)] for i in range(TIMELINE_POINTS - 1)] + [points[-1]]
    return {"seconds": [round(t, 3) for t, _ in points], "samples": [n for _, n in points]}


def _steady_state(stats: RunStats) -> dict[str, object] | None:
    """From the end of the first model call to the end of the last: warm-up (Ray's start, the model load, the
    first batch through every stage) excluded. With one model actor its calls run one after another, so the
    later calls' busy seconds over the window is the fraction of time the model was generating."""
    if len(stats.model_calls) < 2:
        return None
    ends = sorted(stats.model_calls)
    later = [stats.model_calls[end] for end in ends[1:]]
    seconds = (ends[-1] - ends[0]) / 1e6
    samples = int(sum(call[1] for call in later))
    return {
        "model_calls": len(ends),
        "samples": samples,
        "seconds": round(seconds, 3),
        "images_per_second": round(samples / seconds, 3) if seconds > 0 else None,
        "model_busy_seconds": round(sum(call[0] for call in later), 3),
    }


def render_summary(summary: dict[str, object], summary_url: str | None) -> str:
    samples = summary["samples"]
    shards = summary["shards"]
    assert isinstance(samples, dict) and isinstance(shards, dict)
    lines = [
        f"run {summary['run_id']} of job {summary['job']}: {summary['status']}"
        + (f" ({summary['error']})" if summary.get("error") else ""),
        f"  samples   {samples['read']} read, {samples['succeeded']} succeeded, {samples['failed']} failed",
    ]
    for reason, count in samples["failed_by_reason"].items():
        lines.append(f"            {count} {reason}")
    lines.append(
        f"  shards    {shards['total']} total: {shards['ok']} ok, {shards['partial']} partial, "
        f"{shards['failed']} failed"
        + (f", {shards['unfinished']} unfinished" if shards["unfinished"] else "")
        + (
            f"; {shards['skipped_already_committed']} skipped (already committed)"
            if shards.get("skipped_already_committed")
            else ""
        )
    )
    for problem in shards["problems"]:
        lines.append(f"            {problem['status']}: {problem['shard']}: {problem['error'] or '-'}")
    repaired = summary.get("repaired") or []
    if repaired:
        lines.append(f"  repaired  {len(repaired)} shard(s) marked done whose committed file was missing or changed:")
        for repair in repaired:
            lines.append(f"            {repair['shard']}: {repair['reason']}")
    lines.append(f"  wall      {summary['wall_seconds']:.1f} s, {summary['images_per_second'] or 0:.2f} images/s")
    checks = summary.get("processor_checks") or {}
    if checks.get("remembered"):
        lines.append(
            f"  checks    {checks['remembered']} processor check(s) passed before for the same files and prompts"
            + (f", {checks['ran']} run" if checks.get("ran") else "")
        )
    stages = summary["stages"]
    assert isinstance(stages, dict)
    busy = ", ".join(f"{name} {info['busy_seconds']:.1f} s" for name, info in stages.items())
    lines.append(f"  busy      {busy}")
    lines.extend(render_usage(summary))
    actors = render_actors(summary.get("actors") or {})
    if actors:
        lines.append(actors)
    embeddings = summary.get("embeddings") or {}
    if embeddings:
        described = [
            f"{column} ({info['model']}" + (f", {info['dimension']}-d)" if info.get("dimension") else ")")
            for column, info in embeddings.items()
        ]
        lines.append(f"  embedded  {', '.join(described)}")
    lines.append(f"  outputs   {len(shards['outputs'])} Parquet file(s) under {summary['output']}")
    if shards.get("rows_replaced"):
        lines.append(f"  retried   {shards['rows_replaced']} row(s) replaced in place")
    if summary_url:
        lines.append(f"  summary   {summary_url}")
    if summary.get("report_url"):
        lines.append(f"  report    {summary['report_url']}")
    return "\n".join(lines)


def summary_json(summary: dict[str, object]) -> str:
    return json.dumps(summary, indent=2, sort_keys=False) + "\n"
