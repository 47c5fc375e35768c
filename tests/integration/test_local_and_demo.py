"""Local paths in and out, and the README's demo command."""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

import pytest
from support import BackgroundScenario, base_job, read_local_output, run_cli

from pipeline.cli import main
from pipeline.testing.shards import write_shards


def test_local_glob_in_file_url_out_keeps_the_directory_layout(ray_address, tiny_model, tmp_path, write_job):
    data = tmp_path / "data"
    write_shards(data / "2026-11-20", shards=2, samples_per_shard=3, seed=1)
    write_shards(data / "2026-11-21", shards=1, samples_per_shard=4, seed=2)
    out = tmp_path / "out"
    job = base_job(
        "unused",
        tiny_model,
        input={"urls": [f"{data}/**/*.tar"]},
        output={"url": f"file://{out}"},
    )
    job["tasks"] = {"tags": {"max_new_tokens": 4}}
    assert main(["run", str(write_job(job))]) == 0

    files = sorted(str(p.relative_to(out)) for p in out.rglob("*.parquet") if "_staging" not in p.parts)
    assert files == [
        "2026-11-20/shard-00000.parquet",
        "2026-11-20/shard-00001.parquet",
        "2026-11-21/shard-00000.parquet",
    ]
    table = read_local_output(out)
    assert Counter(Counter(zip(table.column("shard").to_pylist(), table.column("key").to_pylist())).values()) == {1: 10}
    assert table.column("caption").null_count == table.num_rows  # the caption task was off
    assert all(isinstance(tags, list) for tags in table.column("tags").to_pylist())
    assert list((out / "_runs").glob("*.json"))
    assert not list((out / "_staging").rglob("*.parquet")) if (out / "_staging").exists() else True


def test_demo_command_runs_s3_to_s3_and_prints_rows(capsys, ray_address, tmp_path, monkeypatch):
    """The README's first command, on a small scale, in-process on the session's Ray to save its start-up.

    The demo starts an S3 server of its own; the endpoint the driver resolves is what workers use.
    No AWS settings come from outside, as on a fresh machine."""
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    result = run_cli(capsys, "demo", "--shards", "2", "--samples-per-shard", "5", "--workdir", str(tmp_path / "demo"))
    assert result.exit_code == 0, result.stderr[-3000:]
    out = result.stdout
    assert "local S3 server at http://127.0.0.1:" in out
    assert "samples   14 read, 12 succeeded, 2 failed" in out
    assert "corrupt_image" in out and "unrecognized_image" in out
    assert "summary   s3://demo/captions/_runs/" in out
    assert "caption: " in out and "Q: What colour is the background?" in out
    # The bundled model is trained on these shapes: the demo counts rows that match their own ground truth.
    assert re.search(r"\n(\d+) of 10 generated images got a caption, tags and answers that all match", out)
    # The run updated the search index next to its outputs; the demo searched it by text, paraphrase and image,
    # and the bundled CLIP (trained on these shapes) ranks an image with the queried caption first.
    assert "search index s3://demo/captions/_index: 12 rows" in out
    searches = out.split("\nllava-pipeline search s3://demo/captions/_index ")[1:]
    assert len(searches) == 3, out[-3000:]
    assert searches[0].startswith('"') and searches[1].startswith('"') and searches[2].startswith("--image img0")
    assert "--mode caption" in searches[1].splitlines()[0]
    for search in searches[:2]:  # the image search's query may share its shape and colour with no other image
        first_hit = search.splitlines()[1]
        assert first_hit.strip().startswith("1. ") and first_hit.endswith("ok"), search
    assert searches[2].splitlines()[1].strip().startswith("1. img0")


LOCAL_RAY_SCRIPT = """
import json, os
# The driver's own settings, which its workers do not take.
os.environ.pop("TRANSFORMERS_VERBOSITY", None)
os.environ["TOKENIZERS_PARALLELISM"] = "true"
import ray
from pipeline.config import JobConfig
from pipeline.runner import connect_ray

names = ("TRANSFORMERS_VERBOSITY", "TOKENIZERS_PARALLELISM")
job = JobConfig.model_validate({"name": "j", "input": {"urls": ["/d/*.tar"]}, "output": {"url": "/d/out/"},
                                "model": {"source": "/m"}, "tasks": {"caption": {}}, "ray": {"num_cpus": 1}})
assert connect_ray(job)
workers = ray.get(ray.remote(lambda: {n: os.environ.get(n) for n in names}).remote())
print("ENV " + json.dumps({"workers": workers, "driver": {n: os.environ.get(n) for n in names},
                           "job_runtime_env": ray.get_runtime_context().runtime_env}))
ray.shutdown()
"""


def start_local_ray_scenario(workdir: Path) -> BackgroundScenario:
    """A Ray started by `connect_ray`, in a process of its own, started with the session (`background`): most of
    its time is Ray starting, which runs beside the session's other tests."""
    return BackgroundScenario.start([sys.executable, "-c", LOCAL_RAY_SCRIPT], {})


@pytest.mark.background.with_args(start_local_ray_scenario)  # with_args: the one argument is a function
def test_a_local_ray_gives_its_workers_the_run_environment_and_leaves_the_driver_as_it_was(
    background_scenarios, request
):
    """`connect_ray` starting a Ray of its own: its workers see the run's variables without a job runtime_env
    (which would keep the workers Ray prestarted from this job), and the driver's own environment is unchanged."""
    scenario = background_scenarios[request.node.nodeid]
    stdout, stderr = scenario.outcome(timeout=180)
    assert scenario.process.returncode == 0, stderr[-3000:]
    found = json.loads(stdout.rpartition("ENV ")[2])
    assert found["workers"] == {"TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    assert found["driver"] == {"TRANSFORMERS_VERBOSITY": None, "TOKENIZERS_PARALLELISM": "true"}
    assert not found["job_runtime_env"].get("env_vars")
