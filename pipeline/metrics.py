"""Live metrics: counters, gauges and histograms through Ray's metrics API (`ray.util.metrics`).

Each Ray node's metrics agent serves them to Prometheus on its metrics export port (`ray start
--metrics-export-port`; KubeRay opens it as the pods' `metrics` port, 8080). Ray adds the `ray_` prefix and a
`_total` suffix to counters, and the labels `WorkerId`, `NodeAddress` and `SessionName` to every series, so
`samples_in` is scraped as `ray_llava_pipeline_samples_in_total{job, run, stage, WorkerId, ...}`: one series per
process, to be summed.

What is counted where:

- in the stages' workers, once per batch for every stage (`RowStage.__call__`, and the read stage's blocks):
  sample rows in and out, the samples each stage failed (by `error_reason`), batch latency, and one
  `actors_alive` gauge per actor of an actor stage; the model stage adds the tokens in and out per task;
- on the driver (`DriverMetrics`, fed by the runner): samples committed, failed samples by reason, shards
  committed by status, and images/s.

Queue depth in front of the model stage: the samples the prepare stage has handed on and the model stage has
not yet received, `samples_out{stage="prepare"} - samples_in{stage="model"}` summed over workers (the
dashboard's "queue in front of the model" panel). Both counters are counted where the rows are, so the
difference costs nothing extra and is exact, unlike sampling Ray Data's internal operator queues.

The labels (job name and run id) travel to the workers in the dataset's `DataContext`, which Ray Data hands to
every task and actor it starts. Metric objects are created on first use in each process, never at import.
"""

from __future__ import annotations

import sys
import time
from collections import Counter as Tally
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import rows

if TYPE_CHECKING:
    from pipeline.summary import RunStats

PREFIX = "llava_pipeline_"
LABELS_CONFIG_KEY = "llava_pipeline.metric_labels"
# Batch latencies from a fast CPU stage (milliseconds) to a slow model call (minutes).
BATCH_SECONDS_BOUNDARIES = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]
# Images/s on the driver: committed samples over this trailing window.
RATE_WINDOW_SECONDS = 30.0


@dataclass(frozen=True)
class MetricSpec:
    kind: str  # "counter", "gauge" or "histogram"
    description: str
    tag_keys: tuple[str, ...]


_STAGE = ("job", "run", "stage")
_RUN = ("job", "run")
SPECS: dict[str, MetricSpec] = {
    "samples_in": MetricSpec("counter", "Sample rows a stage received.", _STAGE),
    "samples_out": MetricSpec("counter", "Sample rows a stage handed on, failed ones included.", _STAGE),
    "failures": MetricSpec("counter", "Samples a stage failed, by error_reason.", (*_STAGE, "reason")),
    "batch_seconds": MetricSpec("histogram", "Seconds a stage spent on one batch.", _STAGE),
    "actors_alive": MetricSpec(
        "gauge", "1 per live actor of an actor stage (one series per worker: sum them).", _STAGE
    ),
    "prompt_tokens": MetricSpec("counter", "Prompt tokens sent to the model, by task.", (*_STAGE, "task")),
    "generated_tokens": MetricSpec("counter", "Tokens the model generated, by task.", (*_STAGE, "task")),
    "committed_samples": MetricSpec("counter", "Samples committed to the output by the driver.", _RUN),
    "committed_failures": MetricSpec(
        "counter", "Committed samples that are error rows, by error_reason.", (*_RUN, "reason")
    ),
    "committed_shards": MetricSpec(
        "counter", "Shards the driver finished, by status (ok, partial, failed).", (*_RUN, "status")
    ),
    "images_per_second": MetricSpec(
        "gauge", f"Samples committed per second over the last {RATE_WINDOW_SECONDS:g} s.", _RUN
    ),
}

# This process's metric objects, created on first use (Ray registers a metric when it is constructed).
_created: dict[str, object] = {}


def _metric(name: str):
    found = _created.get(name)
    if found is None:
        from ray.util import metrics

        spec = SPECS[name]
        full = f"{PREFIX}{name}"
        if spec.kind == "counter":
            found = metrics.Counter(full, spec.description, tag_keys=spec.tag_keys)
        elif spec.kind == "gauge":
            found = metrics.Gauge(full, spec.description, tag_keys=spec.tag_keys)
        else:
            found = metrics.Histogram(
                full, spec.description, boundaries=BATCH_SECONDS_BOUNDARIES, tag_keys=spec.tag_keys
            )
        _created[name] = found
    return found


def _add(name: str, value: float, tags: dict[str, str]) -> None:
    # Ray's counters refuse an increment of 0, which a batch of only shard_end rows would be.
    if value > 0:
        _metric(name).inc(value, tags=tags)


def _ray_running() -> bool:
    # A stage called outside Ray (unit tests, tools) records nothing, and does not import Ray to find that out.
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def label_dataset(job: str, run: str) -> None:
    """Label the metrics of the dataset about to be built (its tasks and actors get this DataContext)."""
    from ray.data import DataContext

    DataContext.get_current().set_config(LABELS_CONFIG_KEY, {"job": job, "run": run})


class StageMetrics:
    """One stage instance's metrics; does nothing when the labels are absent (outside a run)."""

    def __init__(self, stage: str, labels: dict[str, str] | None):
        self.tags = {**labels, "stage": stage} if labels else None
        self._alive_set = False
        self._in_actor = False
        self._last_record: float | None = None

    @classmethod
    def current(cls, stage: str) -> "StageMetrics":
        labels = None
        if _ray_running():
            from ray.data import DataContext

            labels = DataContext.get_current().get_config(LABELS_CONFIG_KEY)
        return cls(stage, labels)

    def received(self, table: pa.Table) -> None:
        """Sample rows arriving, counted before the work so the queue in front of a slow stage shows."""
        if self.tags is not None:
            _add("samples_in", _count_samples(table), self.tags)

    def handed_on(self, table: pa.Table, reasons: Iterable[str | None], seconds: float) -> None:
        if self.tags is None:
            return
        self._last_record = time.monotonic()
        _add("samples_out", _count_samples(table), self.tags)
        for reason, count in Tally(r for r in reasons if r is not None).items():
            _add("failures", count, {**self.tags, "reason": reason})
        _metric("batch_seconds").observe(seconds, tags=self.tags)

    def actor_alive(self) -> None:
        """Once per actor: a gauge of 1 under this worker's id, which Ray drops when the worker is gone."""
        if self.tags is None or self._alive_set:
            return
        import ray

        if ray.get_runtime_context().get_actor_id() is not None:
            self._in_actor = True
            _metric("actors_alive").set(1, tags=self.tags)
        self._alive_set = True

    def settle(self) -> None:
        """Hold an exiting actor until Ray's next metrics export has taken its last counts.

        Workers export what they recorded every `metrics_report_interval_ms` (10 s by default); an actor the
        pool lets go (end of the run, scale-down) would otherwise lose what it counted since the last export.
        Ray Data calls this (through the stage's `__del__`) after the actor's last batch, so only the actor's
        exit waits, never the run. Task workers live on and export later; they do not wait.
        """
        if self.tags is None or not self._in_actor or self._last_record is None:
            return
        import ray

        config = getattr(ray, "_config", None)
        interval_ms = config.metrics_report_interval_ms() if config is not None else 10_000
        remaining = 1.5 * max(interval_ms, 1000) / 1000 - (time.monotonic() - self._last_record)
        if remaining > 0:
            time.sleep(remaining)

    def count_tokens(self, task_tokens: list[list[dict[str, object]] | None]) -> None:
        """The model's tokens in and out, by task, from the rows' `task_tokens` entries."""
        if self.tags is None:
            return
        prompt, generated = Tally(), Tally()
        for counts in task_tokens:
            for entry in counts or ():
                prompt[entry["task"]] += entry["prompt_tokens"]
                generated[entry["task"]] += entry["generated_tokens"]
        for task in prompt:
            _add("prompt_tokens", prompt[task], {**self.tags, "task": task})
            _add("generated_tokens", generated[task], {**self.tags, "task": task})


def _count_samples(table: pa.Table) -> int:
    if not table.num_rows:
        return 0
    return pc.sum(pc.equal(table.column(rows.RECORD), rows.SAMPLE)).as_py() or 0


class DriverMetrics:
    """The run as the driver commits it: samples, failures, shards and images/s."""

    def __init__(self, job: str, run: str):
        self.tags = {"job": job, "run": run} if _ray_running() else None

    def observe(self, admitted: pa.Table, stats: "RunStats") -> None:
        """A batch the committer admitted (rows seen before are already dropped)."""
        if self.tags is None:
            return
        samples = admitted.filter(pc.equal(admitted.column(rows.RECORD), rows.SAMPLE))
        if samples.num_rows:
            _add("committed_samples", samples.num_rows, self.tags)
            for reason, count in Tally(samples.column("error_reason").drop_null().to_pylist()).items():
                _add("committed_failures", count, {**self.tags, "reason": reason})
        _metric("images_per_second").set(stats.recent_rate(RATE_WINDOW_SECONDS, time.monotonic()), tags=self.tags)

    def shard_finished(self, status: str) -> None:
        if self.tags is not None:
            _add("committed_shards", 1, {**self.tags, "status": status})
