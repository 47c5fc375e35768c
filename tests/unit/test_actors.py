"""Actors per stage over a run (`pipeline.actors`): which actors count for which stage, the step series the
sampler keeps, that a failing sample never fails the run, and the summary's `actors` line.
The sampling against a real cluster is checked by tests/integration/test_autoscaling.py."""

from __future__ import annotations

import logging
import time

from jobs import minimal_job
from pipeline.actors import ActorSampler, actor_stages, count_by_stage, peak, render_actors

STAGES = {"prepare": "PrepareStage", "model": "GenerateStage"}


def test_actor_stages_are_the_stages_run_in_actor_pools() -> None:
    assert actor_stages(minimal_job()) == STAGES


def test_actors_are_counted_by_the_operator_ray_data_names_them_after() -> None:
    names = [
        "MapWorker(MapBatches(GenerateStage))",
        "MapWorker(MapBatches(GenerateStage))",
        # Fused with the operator before it, the pool's class carries both names.
        "MapWorker(ReadReadWebDatasetShards->MapBatches(PrepareStage))",
        "_StatsActor",  # Ray Data's own actors, and anything else of the job, are no stage's
        "AutoscalingCoordinator",
        "MapWorker(MapBatches(GenerateStageV2))",
        "MapWorker(MapBatches(GenerateStage)->MapBatches(ParseStage))",
    ]
    assert count_by_stage(names, STAGES) == {"prepare": 1, "model": 3}
    assert count_by_stage([], STAGES) == {"prepare": 0, "model": 0}


def test_sampler_keeps_a_point_only_when_a_count_changes() -> None:
    samples = iter(
        [
            [],
            ["MapWorker(MapBatches(PrepareStage))", "MapWorker(MapBatches(GenerateStage))"],
            ["MapWorker(MapBatches(PrepareStage))", "MapWorker(MapBatches(GenerateStage))"],
            ["MapWorker(MapBatches(PrepareStage))"] + ["MapWorker(MapBatches(GenerateStage))"] * 3,
            [],
        ]
    )
    sampler = ActorSampler(STAGES, source=lambda: next(samples))
    for _ in range(5):
        sampler.sample()
    assert [count for _, count in sampler.series["model"]] == [0, 1, 3, 0]
    assert [count for _, count in sampler.series["prepare"]] == [0, 1, 0]
    times = [at for at, _ in sampler.series["model"]]
    assert times == sorted(times) and all(at >= 0 for at in times)
    assert peak(sampler.series) == {"prepare": 1, "model": 3}


def test_sampler_thread_samples_until_stopped_and_a_failing_source_never_fails_the_run(caplog) -> None:
    calls = []

    def flaky() -> list[str]:
        calls.append(1)
        if len(calls) % 2:
            raise ConnectionError("GCS unavailable")
        return ["MapWorker(MapBatches(GenerateStage))"]

    with caplog.at_level(logging.WARNING, logger="pipeline.actors"):
        with ActorSampler(STAGES, every_seconds=0.01, source=flaky) as sampler:
            deadline = time.monotonic() + 10
            while len(calls) < 6 and time.monotonic() < deadline:
                time.sleep(0.005)
    settled = len(calls)
    assert sampler.series["model"][0][1] == 1
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1  # warned once
    assert "GCS unavailable" in caplog.records[0].message
    assert len(calls) == settled  # stopped with the block


def test_no_actor_stages_means_no_thread_and_no_line() -> None:
    with ActorSampler({}, source=lambda: 1 / 0) as sampler:
        pass
    assert sampler.series == {}
    assert render_actors(sampler.series) is None


def test_summary_line_shows_each_stage_peak_and_its_steps() -> None:
    series = {"prepare": [[0.0, 0], [3.1, 1], [40.2, 0]], "model": [[0.0, 0], [5.0, 1], [21.4, 3], [40.2, 0]]}
    assert render_actors(series) == "  actors    prepare max 1 (0 1 0), model max 3 (0 1 3 0)"
    long = {"model": [[float(i), i % 4] for i in range(30)]}
    assert render_actors(long) == "  actors    model max 3 (0 1 2 3 0 1 ... 0 1 2 3 0 1)"


def test_stages_joined_in_one_actor_each_count_its_actors() -> None:
    stages = actor_stages(minimal_job(prepare={"in_model_actors": True}))
    assert stages == {"prepare": "PrepareStage+GenerateStage", "model": "PrepareStage+GenerateStage"}
    names = ["MapWorker(MapBatches(PrepareStage+GenerateStage))"] * 2
    assert count_by_stage(names, stages) == {"prepare": 2, "model": 2}
