"""How many actors each actor-pool stage had over a run: sampled on the driver, kept as a step series.

Ray Data runs an actor stage as actors of a class named after its operator, `MapWorker(MapBatches(
GenerateStage))` (`MapWorker(A->MapBatches(GenerateStage))` when fused with a neighbouring one), so
the driver can count a stage's actors from the cluster's actor table without help from the stages. A
thread asks the GCS every few seconds for this driver's ALIVE actors (one small RPC; the dashboard's state
API is not needed, so it works on a local Ray started without one) and keeps a point only when a count
changes: `{stage: [[seconds since the run started, actors], ...]}`, compact for a run of any length.
Counts are as sampled: an actor alive for less than the interval may not be seen.

Sampling is an observer: a failed sample is logged once and skipped, and never fails or slows the run.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from pipeline.config import JobConfig

log = logging.getLogger(__name__)

SAMPLE_EVERY_SECONDS = 2.0
# Stopping waits this long for an in-flight sample; a cluster that stopped answering cannot hold up the run.
_STOP_WAIT_SECONDS = 5.0

# {stage: [[seconds since the run started, actors alive], ...]}, one point per change.
ActorSeries = dict[str, list[list[float]]]


def actor_stages(job: "JobConfig") -> dict[str, str]:
    """{stage name: its callable class's name} for the stages that run in actor pools."""
    from pipeline.config import ActorStageConfig
    from pipeline.stages import STAGES
    from pipeline.stages.base import MapStage, placed

    return {
        part.name: stage.fn.__name__  # stages joined in one actor (`in_next_stage`) count its actors each
        for stage in placed(STAGES, job)
        if isinstance(stage, MapStage) and isinstance(stage.section(job), ActorStageConfig)
        for part in stage.stages
    }


def count_by_stage(actor_class_names: list[str], stages: dict[str, str]) -> dict[str, int]:
    """Actors per stage, from the class names of live actors (other actors are not counted)."""
    counts = dict.fromkeys(stages, 0)
    for class_name in actor_class_names:
        if not (class_name.startswith("MapWorker(") and class_name.endswith(")")):
            continue
        operators = class_name[len("MapWorker(") : -1].split("->")  # fused operators, in order
        for stage, fn_name in stages.items():
            if f"MapBatches({fn_name})" in operators:
                counts[stage] += 1
    return counts


def alive_actor_class_names() -> list[str]:
    """Class names of this driver's ALIVE actors, from the GCS actor table."""
    import ray
    from ray._private import state  # the GCS actor table, filtered server-side; ray.util.state needs a dashboard

    job_id = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
    return [info["ActorClassName"] for info in state.actors(job_id=job_id, actor_state_name="ALIVE").values()]


class ActorSampler:
    """Samples actors per stage in a background thread while the block runs; `series` holds the result."""

    def __init__(
        self,
        stages: dict[str, str],
        *,
        started: float | None = None,
        every_seconds: float = SAMPLE_EVERY_SECONDS,
        source: Callable[[], list[str]] = alive_actor_class_names,
    ):
        self.stages = stages
        self.started = time.monotonic() if started is None else started
        self.every_seconds = every_seconds
        self.source = source
        self.series: ActorSeries = {stage: [] for stage in stages}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="actor-sampler", daemon=True)
        self._warned = False

    def __enter__(self) -> "ActorSampler":
        if self.stages:
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(_STOP_WAIT_SECONDS)

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.every_seconds):
                return

    def sample(self) -> None:
        """One sample: a point for each stage whose count differs from its last one."""
        try:
            names = self.source()
        except Exception as exc:  # an observer: never the reason a run fails
            if not self._warned:
                log.warning("could not count actors per stage (%s: %s); skipping samples", type(exc).__name__, exc)
                self._warned = True
            return
        if self._stop.is_set() and threading.current_thread() is self._thread:
            return  # answered after the block ended: the series is the run's, and already handed on
        at = round(time.monotonic() - self.started, 1)
        for stage, count in count_by_stage(names, self.stages).items():
            points = self.series[stage]
            if not points or points[-1][1] != count:
                points.append([at, count])


def peak(series: ActorSeries) -> dict[str, int]:
    """Most actors each stage had at once (as sampled)."""
    return {stage: max((int(count) for _, count in points), default=0) for stage, points in series.items()}


_STEPS_SHOWN = 12


def render_actors(series: ActorSeries) -> str | None:
    """The summary's `actors` line: each stage's peak and its counts in order, e.g. `model max 3 (0 1 2 3 1 0)`."""
    if not any(series.values()):
        return None
    peaks = peak(series)
    parts = []
    for stage, points in series.items():
        if points:
            counts = [str(int(count)) for _, count in points]
            if len(counts) > _STEPS_SHOWN:
                counts = [*counts[: _STEPS_SHOWN // 2], "...", *counts[-_STEPS_SHOWN // 2 :]]
            parts.append(f"{stage} max {peaks[stage]} ({' '.join(counts)})")
    return "  actors    " + ", ".join(parts)
