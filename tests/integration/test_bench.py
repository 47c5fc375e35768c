"""`llava-pipeline bench` on the tiny model: it runs end to end, prints its figures and writes them as JSON.

Speed is not asserted here (a test machine's load says nothing about the pipeline); docs/benchmarks.md
records measured figures with the command that produced them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_command_runs_and_writes_its_figures(tmp_path: Path) -> None:
    figures_path = tmp_path / "figures.json"
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the bench starts its own Ray
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "bench",
        "--model=tiny",
        "--images=24",
        "--shard-size=8",
        "--batch-size=4",
        "--new-tokens=2",
        "--tasks=all",
        "--bare-images=8",
        "--multitask-images=4",
        "--image-size=48",
        f"--workdir={tmp_path / 'work'}",
        f"--json={figures_path}",
    ]
    done = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for label in ("bare loop", "pipeline", "ratio", "first row", "model busy", "stage busy", "peak memory"):
        assert f"  {label}" in done.stdout, label

    figures = json.loads(figures_path.read_text())
    assert figures["machine"]["cpus"] == os.cpu_count()
    assert figures["model"]["shape"] == "tiny" and figures["model"]["image_tokens"] == 16
    assert figures["bare"]["images"] == 8 and figures["bare"]["images_per_second"] > 0

    pipeline = figures["pipeline"]
    assert pipeline["images"] == pipeline["succeeded"] == 24
    assert 0 < pipeline["steady_images"] < 24, "the first output batch is not part of the steady state"
    assert pipeline["seconds_to_first_row"] < pipeline["wall_seconds"]
    assert 0 < pipeline["model_busy_fraction"] <= 1
    assert pipeline["steady_images_per_second"] > 0
    assert set(pipeline["stage_busy_seconds"]) == {"read", "prepare", "model"}
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
