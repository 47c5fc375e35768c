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
    stream_restarts: int = 0
    # Steady state, on the model stage's own clock: a model call stamps all its rows with one `processed_at`,
    # so the rows tell when each call ended, how long it ran and how many samples it answered. Keyed by that
    # end (microseconds): [busy seconds, samples].
    model_calls: dict[int, list[float]] = field(default_factory=dict)
    # Actors per actor-pool stage over the run, sampled by the driver (`pipeline.actors`).
    actors: ActorSeries = field(default_factory=dict)

    def observe(self, table: pa.Table) -> None:
        for stage in rows.stages_timed(table):
            self.stage_seconds[stage] += pc.sum(table.column(rows.seconds_column(stage))).as_py() or 0.0
        self._observe_model_calls(table)
        samples = table.filter(pc.equal(table.column(rows.RECORD), rows.SAMPLE))
        if not samples.num_rows:
            return
        if self.first_row_seconds is None:
            self.first_row_seconds = time.monotonic() - self.started
        self.samples += samples.num_rows
        self.succeeded += pc.sum(pc.is_null(samples.column("error"))).as_py() or 0
        reasons = samples.column("error_reason").drop_null()
        self.failed_by_reason.update(reasons.to_pylist())

    def _observe_model_calls(self, table: pa.Table) -> None:
        seconds = rows.seconds_column("model")
        if "processed_at" not in table.column_names or seconds not in table.column_names:
            return
        calls = (
            pa.table(
                {
                    "end": table.column("processed_at").cast(pa.int64()),
                    "seconds": table.column(seconds),
                    "samples": pc.equal(table.column(rows.RECORD), rows.SAMPLE).cast(pa.int64()),
                }
            )
            .group_by("end")
            .aggregate([("seconds", "sum"), ("samples", "sum")])
        )
        for end, busy, count in zip(*(calls.column(n).to_pylist() for n in ("end", "seconds_sum", "samples_sum"))):
            if end is not None:
                call = self.model_calls.setdefault(end, [0.0, 0])
                call[0] += busy or 0.0
                call[1] += count or 0

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
        "duplicates_dropped": outcome.duplicates_dropped,
        "stream_restarts": stats.stream_restarts,
        "images_per_second": round(stats.samples / wall, 3) if wall > 0 else None,
        "seconds_to_first_row": round(stats.first_row_seconds, 3) if stats.first_row_seconds is not None else None,
        "stages": stages,
        "steady_state": _steady_state(stats),
        "actors": stats.actors,
    }


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
    lines.append(f"  wall      {summary['wall_seconds']:.1f} s, {summary['images_per_second'] or 0:.2f} images/s")
    stages = summary["stages"]
    assert isinstance(stages, dict)
    busy = ", ".join(f"{name} {info['busy_seconds']:.1f} s" for name, info in stages.items())
    lines.append(f"  busy      {busy}")
    actors = render_actors(summary.get("actors") or {})
    if actors:
        lines.append(actors)
    lines.append(f"  outputs   {len(shards['outputs'])} Parquet file(s) under {summary['output']}")
    if shards.get("rows_replaced"):
        lines.append(f"  retried   {shards['rows_replaced']} row(s) replaced in place")
    if summary_url:
        lines.append(f"  summary   {summary_url}")
    return "\n".join(lines)


def summary_json(summary: dict[str, object]) -> str:
    return json.dumps(summary, indent=2, sort_keys=False) + "\n"
