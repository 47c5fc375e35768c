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
from pipeline.writer import ShardResult


@dataclass
class RunStats:
    started: float = field(default_factory=time.monotonic)
    samples: int = 0
    succeeded: int = 0
    failed_by_reason: Counter = field(default_factory=Counter)
    stage_seconds: Counter = field(default_factory=Counter)
    first_row_seconds: float | None = None

    def observe(self, table: pa.Table) -> None:
        for stage in rows.STAGES:
            column = rows.seconds_column(stage)
            if column in table.column_names:
                self.stage_seconds[stage] += pc.sum(table.column(column)).as_py() or 0.0
        samples = table.filter(pc.equal(table.column(rows.RECORD), rows.SAMPLE))
        if not samples.num_rows:
            return
        if self.first_row_seconds is None:
            self.first_row_seconds = time.monotonic() - self.started
        self.samples += samples.num_rows
        self.succeeded += pc.sum(pc.is_null(samples.column("error"))).as_py() or 0
        reasons = samples.column("error_reason").drop_null()
        self.failed_by_reason.update(reasons.to_pylist())

    @property
    def failed(self) -> int:
        return self.samples - self.succeeded

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


def build_summary(
    *,
    job_name: str,
    run_id: str,
    started_at: datetime,
    stats: RunStats,
    shards: list[ShardResult],
    output_url: str,
    model: str,
    tasks: list[str],
    status: str,
    error: str | None = None,
) -> dict[str, object]:
    wall = stats.elapsed
    by_status = Counter(r.status or "unfinished" for r in shards)
    stages = {}
    for stage in rows.STAGES:
        errors = {r: n for r, n in sorted(stats.failed_by_reason.items()) if rows.REASONS.get(r, ("?",))[0] == stage}
        stages[stage] = {"busy_seconds": round(stats.stage_seconds[stage], 3), "errors_by_reason": errors}
    return {
        "job": job_name,
        "run_id": run_id,
        "status": status,
        "error": error,
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "wall_seconds": round(wall, 3),
        "model": model,
        "tasks": tasks,
        "output": output_url,
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
            "problems": [
                {"shard": r.shard.url, "status": r.status or "unfinished", "samples": r.expected, "error": r.error}
                for r in shards
                if r.status != rows.SHARD_OK
            ],
            "outputs": [r.output_path for r in shards if r.output_path],
        },
        "images_per_second": round(stats.samples / wall, 3) if wall > 0 else None,
        "seconds_to_first_row": round(stats.first_row_seconds, 3) if stats.first_row_seconds is not None else None,
        "stages": stages,
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
        f"{shards['failed']} failed" + (f", {shards['unfinished']} unfinished" if shards["unfinished"] else "")
    )
    for problem in shards["problems"]:
        lines.append(f"            {problem['status']}: {problem['shard']}: {problem['error'] or '-'}")
    lines.append(f"  wall      {summary['wall_seconds']:.1f} s, {summary['images_per_second'] or 0:.2f} images/s")
    stages = summary["stages"]
    assert isinstance(stages, dict)
    busy = ", ".join(f"{name} {info['busy_seconds']:.1f} s" for name, info in stages.items())
    lines.append(f"  busy      {busy}")
    lines.append(f"  outputs   {len(shards['outputs'])} Parquet file(s) under {summary['output']}")
    if summary_url:
        lines.append(f"  summary   {summary_url}")
    return "\n".join(lines)


def summary_json(summary: dict[str, object]) -> str:
    return json.dumps(summary, indent=2, sort_keys=False) + "\n"
