"""Autoscaling shown working: on a local autoscaling cluster, the model pool starts at its minimum, grows to
its maximum while work waits, Ray's autoscaler adds a worker node for it and removes the node once idle,
and every key is written exactly once.

The cluster is Ray's fake multi-node provider (`RAY_FAKE_CLUSTER`): the head's autoscaler starts and stops
real raylets on this machine as "nodes" of the configured type, as it would ask KubeRay for pods. Each
model actor asks for one GPU (a logical one: the tiny model runs on the CPU); the head has one, so the
pool of [1, 2] starts there and can grow only onto a worker node with another. It needs its own cluster,
so it runs in its own process, like the node-loss test. It is started with `ray.cluster_utils.Cluster`
and an autoscaling config rather than `AutoscalingCluster`, whose `start()` and `shutdown()` run
`ray stop --force` and would take down every other Ray on the machine (the suite's session Ray
included), and whose base config (`fake_multi_node/example.yaml`) the Ray wheel does not ship; here
only this cluster's processes are stopped.

Most of the scenario's time is waiting (for nodes and actors to start, for the idle node to go), so it is a
`background` test: its process starts with the session, beside the unit tests, and the test, run last,
checks what it did. It reads and writes local files, as it starts before the session's S3 server.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from support import SHAPES_MODEL, BackgroundScenario, assert_exactly_once, base_job, read_local_output

from pipeline import faults
from pipeline.testing.shards import write_shards

CLUSTER = {
    # Room for the stage tasks and one model actor, which prepares its own batches (base_job; a logical GPU:
    # the tiny model runs on the CPU). A pool of [1, 2] starts on the head and needs a worker node to grow.
    "head": {"CPU": 2, "GPU": 1},
    # One model actor per node; no CPUs, so stage tasks stay on the head (and start no workers there).
    "worker": {"CPU": 0, "GPU": 1, "object_store_memory": 100 * 1024 * 1024},
    "max_workers": 1,
}
MODEL_POOL = (1, 2)

AUTOSCALING_SCRIPT = """
import json, os, socket, sys, threading, time
import psutil
import ray
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID
from ray.cluster_utils import Cluster
from pipeline.actors import SAMPLE_EVERY_SECONDS, actor_stages, alive_actor_class_names, count_by_stage
from pipeline.config import JobConfig
from pipeline.runner import run_job

job = JobConfig.model_validate(json.loads(sys.argv[1]))
cluster_shape = json.loads(sys.argv[2])
config_path, release_path = sys.argv[3], sys.argv[4]
most_model_actors = job.stages.model.concurrency[1]

with socket.socket() as probe:  # the autoscaler's node provider must know the GCS address before the head starts
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
ip = ray._private.services.get_node_ip_address()
config = {
    "cluster_name": "autoscaling-test",
    "max_workers": cluster_shape["max_workers"],
    "provider": {
        "type": "fake_multinode",
        "gcs_address": f"{ip}:{port}",
        "use_node_id_as_ip": True,
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
    },
    "available_node_types": {
        "ray.head.default": {"resources": cluster_shape["head"], "node_config": {}, "max_workers": 0},
        "gpu": {
            "resources": cluster_shape["worker"],
            "node_config": {},
            "min_workers": 0,
            "max_workers": cluster_shape["max_workers"],
        },
    },
    "head_node_type": "ray.head.default",
    # A node idle for 3 seconds is removed, so the test sees nodes leave within seconds of the run's end.
    "idle_timeout_minutes": 0.05,
    "upscaling_speed": 1.0,
    "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
    "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
    "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
}
with open(config_path, "w") as f:
    json.dump(config, f)

cluster = Cluster(
    initialize_head=True,
    head_node_args={
        "num_cpus": cluster_shape["head"]["CPU"],
        "num_gpus": cluster_shape["head"]["GPU"],
        "gcs_server_port": port,
        "autoscaling_config": config_path,
        "include_dashboard": False,
        "dashboard_agent_listen_port": 0,
        # As `ray start --head` does under RAY_FAKE_CLUSTER: the provider knows the head by this id.
        "env_vars": {"RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID},
        # As the suite's session Ray: idle task workers stay for the next task instead of being restarted.
        "_system_config": {"num_workers_soft_limit": 12, "idle_worker_killing_time_threshold_ms": 600_000},
    },
)
[monitor] = cluster.head_node.all_processes["monitor"]
ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)

def workers_alive():
    return sum(1 for n in ray.nodes() if n["Alive"] and "node:__internal_head__" not in n["Resources"])

stages = actor_stages(job)
def model_actors_alive():
    return count_by_stage(alive_actor_class_names(), stages)["model"]

# Watches the worker nodes, and lifts the slow model (the fault's `until_file`) once the model pool has
# been at its maximum for two of the run's actor samples: from then on the work drains quickly.
nodes = []  # [seconds since start, worker nodes alive], one point per change
started = time.monotonic()
stop = threading.Event()
def watch():
    full_since = None
    while not stop.wait(0.5):
        count = workers_alive()
        if not nodes or nodes[-1][1] != count:
            nodes.append([round(time.monotonic() - started, 1), count])
        if os.path.exists(release_path):
            continue
        if model_actors_alive() < most_model_actors:
            full_since = None
        elif full_since is None:
            full_since = time.monotonic()
        elif time.monotonic() - full_since > 2 * SAMPLE_EVERY_SECONDS:
            open(release_path, "w").close()
            print("pool full; model released at", round(time.monotonic() - started, 1), flush=True)
watcher = threading.Thread(target=watch, daemon=True)
watcher.start()

try:
    result = run_job(job)
    run_seconds = time.monotonic() - started
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and workers_alive():  # idle nodes go once their actors are gone
        time.sleep(0.5)
    stop.set()
    watcher.join()
    nodes.append([round(time.monotonic() - started, 1), workers_alive()])
    print("RESULT", json.dumps({"exit_code": result.exit_code, "summary": result.summary, "nodes": nodes,
                                "run_seconds": round(run_seconds, 1)}), flush=True)
finally:
    ray.shutdown()
    # Worker nodes the autoscaler still holds are raylets it started: stop them by process, then the head.
    leftovers = psutil.Process(monitor.process.pid).children(recursive=True)
    cluster.shutdown()
    for process in leftovers:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
"""


def start_autoscaling_scenario(workdir: Path) -> BackgroundScenario:
    """The scenario's driver and cluster in a process of their own, started with the session (`background`)."""
    # One sample per shard: each shard is one block, one model task, so work queues task by task.
    local = write_shards(workdir / "shards", shards=12, samples_per_shard=1, seed=3)
    out = workdir / "out"
    # Local shards and outputs: the scenario starts before the session's S3 server, and runs beside it.
    job = base_job(
        "unused",
        SHAPES_MODEL,
        input={"urls": [f"{workdir}/shards/*.tar"]},
        output={"url": f"file://{out}"},
        stages={
            # One read and one parse task at a time: a couple of task workers on the head, not one per shard.
            "read": {"num_cpus": 0.25, "concurrency": 1},
            "model": {"concurrency": list(MODEL_POOL), "num_gpus": 1, "num_cpus": 0, "batch_size": 2},
            "parse": {"num_cpus": 0.25, "concurrency": 1},
        },
    )
    # Each model call takes 5 seconds longer (a slow GPU, without spending this machine's CPUs) until the
    # pool has grown to its maximum: work waits in front of the model stage while nodes and actors start,
    # however long this machine takes, and drains quickly once the pool is full.
    release = workdir / "pool-is-full"
    slow_model = {
        "state_dir": str(workdir / "faults"),
        "rules": {"model.batch": {"action": "delay", "seconds": 5, "times": -1, "until_file": str(release)}},
    }
    environment = {
        faults.ENV: json.dumps(slow_model),
        "RAY_FAKE_CLUSTER": "1",  # the fake multi-node provider runs only when asked for by this
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",  # the autoscaler looks every second instead of every 5
        # Ray Data asks the autoscaler for more every 2 seconds instead of every 10.
        "RAY_DATA_MIN_GAP_BETWEEN_AUTOSCALING_REQUESTS": "2",
    }
    arguments = [json.dumps(job), json.dumps(CLUSTER), str(workdir / "autoscaling.json"), str(release)]
    return BackgroundScenario.start(
        [sys.executable, "-c", AUTOSCALING_SCRIPT, *arguments], environment, shards=local, out=out
    )


@pytest.mark.background.with_args(start_autoscaling_scenario)  # with_args: the one argument is a function
def test_model_pool_grows_from_its_minimum_as_nodes_join_then_nodes_leave_exactly_once(background_scenarios, request):
    scenario = background_scenarios[request.node.nodeid]
    stdout, stderr = scenario.outcome(timeout=300)
    [line] = [line for line in stdout.splitlines() if line.startswith("RESULT ")] or [None]
    assert line, stdout[-3000:] + stderr[-5000:]
    outcome = json.loads(line.removeprefix("RESULT "))
    summary, nodes = outcome["summary"], outcome["nodes"]
    print(stdout[-3000:])
    print("model actors:", summary["actors"]["model"], "worker nodes:", nodes, "run:", outcome["run_seconds"], "s")
    print("scenario wall:", scenario.wall_seconds, "s")
    assert outcome["exit_code"] == 0, summary.get("error")
    assert scenario.process.returncode == 0, stderr[-3000:]

    # The model pool started at its minimum and grew to its maximum.
    counts = [count for _, count in summary["actors"]["model"]]
    low, high = MODEL_POOL
    assert [c for c in counts if c][0] == low, counts
    assert max(counts) == high, counts
    assert f"model max {high} (" in stdout  # the printed summary's `actors` line
    # The worker node joined for the second model actor (the head holds one), and left once idle.
    assert max(count for _, count in nodes) == CLUSTER["max_workers"], nodes
    assert nodes[-1][1] == 0, nodes

    assert_exactly_once(read_local_output(scenario.details["out"]), scenario.details["shards"])
