"""Nothing lost, nothing twice: every test here checks the whole output, key by key.

Faults are real: an HTTP proxy that fails object-store requests, drivers and actors killed with
SIGKILL (`pipeline.faults` rules, forwarded to Ray workers), a multi-node local cluster losing a node.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pytest
from support import (
    SHAPES_MODEL,
    BackgroundScenario,
    assert_exactly_once,
    base_job,
    read_local_output,
    read_output,
    upload,
)

from pipeline import faults
from pipeline.cli import main
from pipeline.config import JobConfig
from pipeline.runner import retry_failed, run_job
from pipeline.testing.fault_proxy import FaultProxy
from pipeline.testing.shards import synthetic_samples, write_shard, write_shards

SCRIPT = str(Path(sys.executable).parent / "llava-pipeline")


def make_shards(
    s3, bucket: str, tmp_path: Path, shards: int, samples: int, seed: int = 1, start: int = 0
) -> list[Path]:
    """Shard files written locally (all of them) and uploaded (from `start` on); every local path."""
    paths = write_shards(tmp_path / "shards", shards=shards + start, samples_per_shard=samples, seed=seed)
    for path in paths[start:]:
        upload(s3, path, f"{bucket}/shards/{path.name}")
    return paths


def load(job: dict) -> JobConfig:
    return JobConfig.model_validate(job)


def listing(s3, bucket: str) -> dict[str, str]:
    fs = s3.filesystem()
    return {path: info["ETag"] for path, info in fs.find(f"{bucket}/out", detail=True).items()}


def test_flaky_object_store_loses_and_repeats_nothing(s3, ray_address, tiny_model, bucket, tmp_path, capfd):
    local = tmp_path / "shards"
    local.mkdir()
    denied = tmp_path / "denied"
    denied.mkdir()
    write_shard(denied / "shard-00004.tar", synthetic_samples(3, seed=4, key_prefix="s4"))
    upload(s3, denied / "shard-00004.tar", f"{bucket}/shards/shard-00004.tar")
    for index in range(4):
        samples = synthetic_samples(10, seed=index, key_prefix=f"s{index}")
        if index == 0:
            # A member name that tries to climb out of the prefix: it is data, never a path we write to.
            samples.append({"__key__": "../../escape", "jpg": samples[0]["jpg"]})
        write_shard(local / f"shard-{index:05d}.tar", samples)
        upload(s3, local / f"shard-{index:05d}.tar", f"{bucket}/shards/shard-{index:05d}.tar")

    secret = "s3cr3t-never-printed-0123456789"
    proxy = FaultProxy(s3.endpoint_url, error_rate=0.15, drop_rate=0.1, seed=7, forbidden=("shard-00004.tar",))
    with proxy:
        job = base_job(
            bucket,
            tiny_model,
            storage={
                "endpoint_url": proxy.endpoint_url,
                "access_key_id": "AKIAFAULTPROXYTEST",
                "secret_access_key": secret,
                # Every fault reaches the job's own policy (its allow-list, its backoff of 0.05 s and up) instead
                # of botocore's retries inside the client, which wait up to seconds each: the test is of ours.
                "request_attempts": 1,
            },
            retries={"initial_backoff_s": 0.05, "max_backoff_s": 0.5, "attempts": 8},
            failures={"max_failed_shards": 1},
            stages={"read": {"num_cpus": 0.25, "rows_per_block": 3}},
        )
        result = run_job(load(job))
    assert proxy.counts["error_503"] + proxy.counts["error_500"] > 5, proxy.counts
    assert proxy.counts["drop_mid_body"] > 0, proxy.counts

    assert result.exit_code == 0, result.summary["error"]
    table = read_output(s3, f"s3://{bucket}/out/")
    assert_exactly_once(table, sorted(local.glob("*.tar")))
    assert table.filter(pc.is_valid(table["error"])).num_rows == 0
    # A denied shard is not retried: it fails at once, with the store's answer, and the rest goes on.
    [problem] = result.summary["shards"]["problems"]
    assert problem["shard"].endswith("shard-00004.tar") and problem["status"] == "failed"
    assert "denied" in problem["error"].lower(), problem["error"]

    fs = s3.filesystem()
    written = sorted(p.removeprefix(f"{bucket}/out/") for p in fs.find(f"{bucket}/out"))
    assert [p for p in written if not p.startswith("_")] == [f"shard-{i:05d}.parquet" for i in range(4)]
    assert not [p for p in written if "escape" in p]

    # The credentials appear nowhere: not in logs, the summary, the markers or the Parquet files.
    output = capfd.readouterr()
    assert secret not in output.out + output.err
    for path in written:
        assert secret.encode() not in fs.cat_file(f"{bucket}/out/{path}"), path


def _fault_env(state_dir: Path, rules: dict) -> dict[str, str]:
    return {faults.ENV: json.dumps({"state_dir": str(state_dir), "rules": rules})}


def _run_cli_process(
    job_path: Path, ray_address: str, env: dict[str, str], *options: str
) -> subprocess.CompletedProcess:
    """`llava-pipeline run` in its own process, joined to the session's Ray: a process to kill."""
    environment = {k: v for k, v in os.environ.items() if k != faults.ENV}
    environment.update({"RAY_ADDRESS": ray_address, **env})
    return subprocess.run(
        [SCRIPT, "run", str(job_path), "--no-progress-bars", *options],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
    )


def test_driver_killed_at_each_point_then_rerun_finishes_exactly_once(
    s3, ray_address, tiny_model, bucket, tmp_path, write_job
):
    # Four shards of three samples: the second driver is killed at its third commit, so the rerun has one shard
    # whose commit was cut short and one never started.
    local = make_shards(s3, bucket, tmp_path, shards=4, samples=3)
    # One commit at a time, so "killed at the third commit" means two shards are in place; with commits on
    # several threads the kill would also cut the others short, which the rerun repairs just the same.
    # One read and one parse task at a time: each driver is a new Ray job, whose task workers all start (and
    # import Ray Data) afresh; a couple of them do this job's work as well as one per shard would.
    job = base_job(
        bucket,
        tiny_model,
        stages={
            "read": {"num_cpus": 0.25, "rows_per_block": 2, "concurrency": 1},
            "parse": {"num_cpus": 0.25, "concurrency": 1},
        },
        output={"commit_threads": 1},
    )
    job_path = write_job(job)
    fs = s3.filesystem()

    def markers() -> int:
        return len(fs.glob(f"{bucket}/out/_done/*.json"))

    # While rows stream in (reads and inference under way): the first batch kills the driver.
    killed = _run_cli_process(job_path, ray_address, _fault_env(tmp_path / "f1", {"driver.rows": {"action": "kill"}}))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert "Started a local Ray instance" not in killed.stderr, "the driver should have joined RAY_ADDRESS"
    assert markers() == 0

    # The killed driver's lease would lapse after output.lease.expiry_s; an operator who knows it is dead takes
    # it at once (the lapse itself is tested in test_integrity.py).
    assert fs.exists(f"{bucket}/out/_lease.json")

    # Mid-commit: two shards are committed, the third is staged but not yet in place.
    killed = _run_cli_process(
        job_path,
        ray_address,
        _fault_env(tmp_path / "f2", {"driver.commit": {"action": "kill", "skip": 2}}),
        "--force-unlock",
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert markers() == 2
    assert fs.glob(f"{bucket}/out/_staging/*/*.parquet"), "the killed commit left its staged file"
    assert len(read_output(s3, f"s3://{bucket}/out/")) == 6  # readers see only the committed shards

    # The rerun is not about the process: it runs in this one, on the same Ray.
    assert main(["run", str(job_path), "--no-progress-bars", "--force-unlock"]) == 0
    assert not fs.exists(f"{bucket}/out/_lease.json")
    [summary_path] = [p for p in fs.glob(f"{bucket}/out/_runs/*.json")]
    summary = json.loads(fs.cat_file(summary_path))
    # The rerun read 2 of the 4 shards: half the work of a full run.
    assert summary["shards"]["skipped_already_committed"] == 2
    assert (summary["shards"]["total"], summary["samples"]["read"]) == (2, 6)
    assert markers() == 4
    assert_exactly_once(read_output(s3, f"s3://{bucket}/out/"), local)


def test_actor_killed_batch_hung_and_out_of_memory_still_exactly_once(
    s3, ray_address, tiny_model, bucket, tmp_path, monkeypatch
):
    local = make_shards(s3, bucket, tmp_path, shards=3, samples=8)
    state = tmp_path / "faults"
    rules = {
        "model.batch": [
            {"action": "kill", "times": 1},  # the first model call: its actor dies mid-batch
            {"action": "hang", "times": 1},  # the next one hangs until the watchdog kills the actor
            {"action": "oom", "times": -1, "min_batch": 8},  # every batch of 8 runs out of memory
        ]
    }
    monkeypatch.setenv(faults.ENV, json.dumps({"state_dir": str(state), "rules": rules}))
    job = base_job(
        bucket,
        tiny_model,
        # The model actor prepares its own batches (base_job): a killed or hung one takes its batch's preparing
        # with it, and the retry on a fresh actor prepares the batch again.
        stages={"model": {"concurrency": 1, "num_gpus": 0, "num_cpus": 0.5, "batch_size": 8, "batch_timeout_s": 4}},
    )
    result = run_job(load(job))
    assert result.exit_code == 0, result.summary["error"]
    assert [faults.fired(state, "model.batch", rule) for rule in (0, 1)] == [1, 1]
    table = read_output(s3, f"s3://{bucket}/out/")
    assert_exactly_once(table, local)
    # Split in halves, every batch of 8 succeeded: no sample became an error row.
    assert table.filter(pc.is_valid(table["error"])).num_rows == 0
    assert all(table["caption"].to_pylist())


def test_model_that_cannot_load_stops_the_run_promptly(s3, ray_address, tiny_model, bucket, tmp_path, monkeypatch):
    make_shards(s3, bucket, tmp_path, shards=1, samples=4)
    rules = {"model.load": {"action": "raise", "times": -1}}
    monkeypatch.setenv(faults.ENV, json.dumps({"state_dir": str(tmp_path / "faults"), "rules": rules}))
    result = run_job(load(base_job(bucket, tiny_model)))
    assert result.exit_code == 1
    assert "injected failure at model.load" in result.summary["error"]
    assert not s3.filesystem().glob(f"{bucket}/out/*.parquet")


def test_rerun_of_finished_job_writes_nothing_and_incremental_run_takes_only_new_shards(
    s3, ray_address, tiny_model, bucket, tmp_path
):
    local = make_shards(s3, bucket, tmp_path, shards=2, samples=4)
    assert run_job(load(base_job(bucket, tiny_model))).exit_code == 0
    before = listing(s3, bucket)

    # The rerun is handed a model that does not exist: it succeeds only because nothing loads a model.
    rerun = run_job(load(base_job(bucket, tmp_path / "no-such-model")))
    assert (rerun.exit_code, rerun.summary["status"], rerun.summary_url) == (0, "nothing_to_do", None)
    assert listing(s3, bucket) == before

    # Tomorrow two new shards land under the same prefix.
    local = make_shards(s3, bucket, tmp_path, shards=2, samples=4, start=2)
    nightly = run_job(load(base_job(bucket, tiny_model)))
    assert nightly.exit_code == 0
    assert nightly.summary["shards"]["total"] == 2
    assert nightly.summary["shards"]["skipped_already_committed"] == 2
    after = listing(s3, bucket)
    assert {p: e for p, e in after.items() if p in before and "_runs" not in p} == {
        p: e for p, e in before.items() if "_runs" not in p
    }, "committed files were rewritten"
    assert_exactly_once(read_output(s3, f"s3://{bucket}/out/"), local)


def test_retry_failed_replaces_only_the_error_rows(s3, ray_address, tiny_model, bucket, tmp_path, monkeypatch):
    local = make_shards(s3, bucket, tmp_path, shards=2, samples=6)
    job = base_job(bucket, tiny_model, failures={"max_failed_sample_fraction": None})
    # Three failing model calls: a chunk of 4, then its first half, then that half's first sample,
    # which ends as the one error row (its neighbours get their captions).
    rules = {"model.batch": {"action": "raise", "times": 3}}
    monkeypatch.setenv(faults.ENV, json.dumps({"state_dir": str(tmp_path / "faults"), "rules": rules}))
    first = run_job(load(job))
    monkeypatch.delenv(faults.ENV)
    assert first.exit_code == 0
    before = read_output(s3, f"s3://{bucket}/out/")
    failed = before.filter(pc.is_valid(before["error"]))
    assert failed.num_rows == 1 and failed["error_reason"].to_pylist() == ["generation_failed"]

    retried = retry_failed(load(job))
    assert retried.exit_code == 0
    assert retried.summary["command"] == "retry-failed"
    assert (retried.summary["samples"]["read"], retried.summary["shards"]["rows_replaced"]) == (1, 1)
    after = read_output(s3, f"s3://{bucket}/out/")
    assert_exactly_once(after, local)
    assert after.filter(pc.is_valid(after["error"])).num_rows == 0
    # Every other row is the row committed the first time.
    untouched = {(r["shard"], r["key"]): r["caption"] for r in before.to_pylist() if r["error"] is None}
    assert {(r["shard"], r["key"]): r["caption"] for r in after.to_pylist() if (r["shard"], r["key"]) in untouched} == (
        untouched
    )
    retried_row = after.filter(pc.equal(after["key"], failed["key"][0])).to_pylist()[0]
    assert retried_row["run_id"] == retried.summary["run_id"] != failed["run_id"][0].as_py()

    again = retry_failed(load(job))
    assert (again.exit_code, again.summary["status"]) == (0, "nothing_to_do")


# Runs in its own process: a multi-node cluster cannot share a process with the session's Ray.
NODE_LOSS_SCRIPT = """
import json, sys, threading, time
import ray
from ray.cluster_utils import Cluster
from pipeline.config import JobConfig
from pipeline.runner import run_job
from pipeline.storage import filesystem, resolve_storage

job = JobConfig.model_validate(json.loads(sys.argv[1]))
# Health checks every second, a node dead after five misses in a row: the lost node is noticed in
# about five seconds instead of Ray's default tens of seconds. A killed raylet refuses at once; a
# live one on a busy machine still has three seconds to answer each check.
fast_health_checks = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 3000,
    "health_check_failure_threshold": 5,
}
# No dashboard (nothing here reads it), and no workers prestarted for the first driver on every node: the
# six processes it would start, each importing Ray, are not needed before the job's first tasks ask for them.
cluster = Cluster(
    initialize_head=True,
    head_node_args={
        "num_cpus": 3,
        "include_dashboard": False,
        "_system_config": {**fast_health_checks, "prestart_worker_first_driver": False},
    },
)
worker = cluster.add_node(num_cpus=3)
cluster.wait_for_nodes()
ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)

def remove_the_worker_once_a_shard_is_committed():
    fs, root = filesystem(job.output.url, resolve_storage(job.storage_for("output")))
    deadline = time.time() + 180
    while time.time() < deadline and not fs.glob(root + "/_done/*.json"):
        time.sleep(0.5)
        fs.invalidate_cache()
    cluster.remove_node(worker, allow_graceful=False)
    print("removed the worker node", flush=True)

threading.Thread(target=remove_the_worker_once_a_shard_is_committed, daemon=True).start()
result = run_job(job)
print("EXIT", result.exit_code, json.dumps(result.summary.get("error")), flush=True)
ray.shutdown()
cluster.shutdown()
sys.exit(result.exit_code)
"""


def start_node_loss_scenario(workdir: Path) -> BackgroundScenario:
    """The node-loss run in a process of its own, started with the session (`background`): most of its time
    is waiting for the cluster, its actors and the lost node's detection. Local shards and outputs: it starts
    before the session's S3 server."""
    local = write_shards(workdir / "shards", shards=6, samples_per_shard=6, seed=1)
    out = workdir / "out"
    job = base_job(
        "unused",
        SHAPES_MODEL,
        input={"urls": [f"{workdir}/shards/*.tar"]},
        output={"url": f"file://{out}"},
        stages={
            # One read and one parse task at a time: without a limit each node starts a task worker per shard,
            # each importing Ray Data afresh, which cost this test more CPU than its actors did.
            "read": {"num_cpus": 0.25, "rows_per_block": 2, "concurrency": 1},
            "parse": {"num_cpus": 0.25, "concurrency": 1},
            # The production layout, a prepare pool feeding the model actors. Both model actors and the rest fit
            # on either node alone, so losing one leaves room to go on.
            "prepare": {"concurrency": 1, "num_cpus": 0.5, "batch_size": 2},
            "model": {"concurrency": 2, "num_gpus": 0, "num_cpus": 1, "batch_size": 2},
        },
    )
    return BackgroundScenario.start(
        [sys.executable, "-c", NODE_LOSS_SCRIPT, json.dumps(job)], {}, shards=local, out=out
    )


@pytest.mark.background.with_args(start_node_loss_scenario)  # with_args: the one argument is a function
def test_node_lost_mid_run_on_a_multi_node_cluster_exactly_once(background_scenarios, request):
    scenario = background_scenarios[request.node.nodeid]
    stdout, stderr = scenario.outcome(timeout=400)
    assert "removed the worker node" in stdout, stdout + stderr[-3000:]
    assert scenario.process.returncode == 0, stdout + stderr[-3000:]
    [summary_path] = (scenario.details["out"] / "_runs").glob("*.json")
    summary = json.loads(summary_path.read_text())
    print("stream restarts:", summary["stream_restarts"], "rows delivered twice:", summary["duplicates_dropped"])
    print("scenario wall:", scenario.wall_seconds, "s")
    assert_exactly_once(read_local_output(scenario.details["out"]), scenario.details["shards"])
