"""Integration fixtures: one local S3 server and one local Ray for the session, a tiny model.

The S3 server is a real HTTP server on 127.0.0.1 (moto); Ray workers inherit its endpoint and
credentials from the environment set before `ray.init`. Jobs run in-process against the session's
Ray (the runner joins an initialized Ray instead of starting one), and CLI subprocess tests join it
through RAY_ADDRESS.
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path
from typing import Callable

import pytest
import yaml

from pipeline.testing.s3_server import LocalS3, start_local_s3, stop_local_s3
from pipeline.testing.tiny_llava import build_tiny_llava


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def s3() -> LocalS3:
    server = start_local_s3()
    with server.as_environment():
        yield server
    stop_local_s3(server)


@pytest.fixture(scope="session")
def metrics_port() -> int:
    """The session Ray's Prometheus endpoint: http://127.0.0.1:<port>/metrics (the node's metrics agent)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def ray_address(s3: LocalS3, metrics_port: int) -> str:
    import ray

    ray.init(
        # A new local Ray even when another one runs on this machine (`ray start`, an autoscaling test's
        # cluster): without it, ray.init joins that one.
        address="local",
        num_cpus=4,
        include_dashboard=False,
        _metrics_export_port=metrics_port,
        _system_config={
            # Keep idle task workers (which have imported the stages) alive between the suite's runs,
            # instead of Ray's default of killing those beyond num_cpus after a second, only to start
            # and import them again at the next run's first read.
            "num_workers_soft_limit": 12,
            "idle_worker_killing_time_threshold_ms": 600_000,
            # Workers report their metrics to the agent every 2 s instead of every 10, so the metrics test
            # finds a run's values soon after the run. Not 1 s: each report must be answered within a
            # fraction of the interval, and a loaded machine's agent then misses some (their counts are lost).
            "metrics_report_interval_ms": 2000,
        },
        runtime_env={"env_vars": {"TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}},
        log_to_driver=False,
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava")


@pytest.fixture
def bucket(s3: LocalS3) -> str:
    """A fresh bucket per test, so tests never see each other's shards or outputs."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(name)
    return name


@pytest.fixture
def write_job(tmp_path: Path) -> Callable[[dict[str, object]], Path]:
    def write(job: dict[str, object]) -> Path:
        path = tmp_path / f"job-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(yaml.safe_dump(job))
        return path

    return write
