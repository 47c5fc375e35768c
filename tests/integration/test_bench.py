"""`llava-pipeline bench` on the tiny model: it runs end to end, prints its figures and writes them as JSON.

The bench runs in-process on the suite's S3 server and Ray (it joins an initialized Ray and leaves it
running), with the smallest settings that still give every figure. Speed is not asserted here (a test
machine's load says nothing about the pipeline); docs/benchmarks.md records measured figures with the
command that produced them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.stages import STAGES
from pipeline.tools.bench import BenchOptions, run_bench


def test_bench_command_parses(capsys) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["bench", "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    for option in ("--model", "--images", "--batch-size", "--tasks", "--bare-images", "--multitask-images", "--json"):
        assert option in out, option


def test_bench_runs_and_writes_its_figures(s3, ray_address, tmp_path: Path) -> None:
    import ray

    figures_path = tmp_path / "figures.json"
    options = BenchOptions(
        model="tiny",
        images=16,
        shard_size=8,
        batch_size=4,
        new_tokens=2,
        tasks="all",
        bare_images=4,
        multitask_images=4,
        image_size=48,
        model_cpus=1,  # fits the suite's Ray (4 CPUs) on any machine
        prepare_actors=1,
        workdir=tmp_path / "work",
        json_path=figures_path,
    )
    lines: list[str] = []
    run_bench(options, echo=lines.append, s3=s3)
    out = "\n".join(lines)
    for label in ("bare loop", "pipeline", "ratio", "first row", "model busy", "stage busy", "peak memory"):
        assert f"  {label}" in out, label
    assert ray.is_initialized(), "the bench joined the suite's Ray and must leave it running"

    figures = json.loads(figures_path.read_text())
    assert figures["machine"]["cpus"] == os.cpu_count()
    assert figures["model"]["shape"] == "tiny" and figures["model"]["image_tokens"] == 16
    assert figures["bare"]["images"] == 4 and figures["bare"]["images_per_second"] > 0

    pipeline = figures["pipeline"]
    assert pipeline["images"] == pipeline["succeeded"] == 16
    assert 0 < pipeline["steady_images"] < 16, "the first output batch is not part of the steady state"
    assert pipeline["seconds_to_first_row"] < pipeline["wall_seconds"]
    assert 0 < pipeline["model_busy_fraction"] <= 1
    assert pipeline["steady_images_per_second"] > 0
    assert pipeline["ray_logical_cpus"] == int(ray.cluster_resources()["CPU"])
    # The bench job embeds nothing, so every stage but `embed` ran.
    assert set(pipeline["stage_busy_seconds"]) == {stage.name for stage in STAGES} - {"embed"}
    assert all(seconds > 0 for seconds in pipeline["stage_busy_seconds"].values())
    memory = pipeline["memory"]
    assert memory["driver_peak_rss_mib"] > 0 and memory["workers_peak_rss_mib"] > 0
    assert memory["largest_worker"].startswith("ray::")

    expected = pipeline["steady_images_per_second"] / figures["bare"]["images_per_second"]
    assert abs(figures["ratio"]["steady_pipeline_over_bare"] - expected) < 0.01 * expected + 1e-3
    multitask = figures["multitask"]
    assert multitask["prompts_per_image"] == 5
    assert multitask["caption"]["images"] == multitask["all_tasks_shared_prefix"]["images"] == 4
    assert multitask["shared_cost_vs_caption"] > 0 and multitask["whole_prompts_cost_vs_caption"] > 0


def test_capacity_bench_measures_every_stage_the_driver_and_a_fixed_answer_run(s3, ray_address, tmp_path: Path) -> None:
    """`bench --model none` at its smallest: real photo-like JPEGs, the LLaVA-1.5 processor at 336 px, the
    driver against the suite's S3 server, and a pipeline run whose model stage answers without a model."""
    from pipeline.tools.bench.capacity import CapacityOptions, run_capacity

    figures_path = tmp_path / "capacity.json"
    options = CapacityOptions(
        families=("llava-1.5",),
        sizes=((1024, 768),),
        per_size_images=2,
        images=4,
        shard_size=2,
        prepare_actors=1,
        driver_shards=2,
        driver_rows_per_shard=20,
        json_path=figures_path,
        workdir=tmp_path / "work",
    )
    lines: list[str] = []
    run_capacity(options, echo=lines.append, s3=s3)
    out = "\n".join(lines)
    assert "prepare" in out and "driver commits" in out and "first committed shard" in out

    figures = json.loads(figures_path.read_text())
    row = figures["per_core"]["llava-1.5"]["1024x768"]
    for stage in ("read", "prepare", "prepare_float32_full_decode", "model_transfer", "parse"):
        assert row[stage]["images_per_second_per_core"] > 0, stage
    # 3 x 336 x 336 uint8 pixels and the prompt's ids: a quarter of the float32 arrays the code shipped before.
    assert 3 * 336 * 336 <= row["prepare"]["bytes_out_per_image"] < 1.1 * 3 * 336 * 336
    assert row["prepare_float32_full_decode"]["bytes_out_per_image"] > 4 * 3 * 336 * 336
    assert [(d["commit_threads"], d["request_latency_ms"]) for d in figures["driver"]] == [
        (1, 0),
        (4, 0),
        (1, 30),
        (4, 30),
    ]
    assert all(d["rows_per_second"] > 0 for d in figures["driver"])
    pipeline = figures["pipeline"]
    assert pipeline["images"] == pipeline["succeeded"] == 4
    assert 0 < pipeline["seconds_to_first_row"] <= pipeline["seconds_to_first_commit"] <= pipeline["wall_seconds"]
    assert pipeline["driver"]["busy_seconds"] > 0
