"""A job that could never be scheduled stops with a message instead of waiting forever."""

from __future__ import annotations

import logging

import pytest

from jobs import minimal_job
from pipeline.errors import ConfigError
from pipeline.jobfile import parse_job
from pipeline.plan import check_cluster_fits


def test_default_stages_need_three_and_a_quarter_cpus_and_a_gpu():
    # a read task (1), one prepare actor (1), one model actor (1) and a parse task (0.25)
    check_cluster_fits(minimal_job(), {"CPU": 3.25, "GPU": 1}, local=True)
    with pytest.raises(ConfigError, match="need 3.25 CPUs .* cluster has 3"):
        check_cluster_fits(minimal_job(), {"CPU": 3, "GPU": 1}, local=True)
    with pytest.raises(ConfigError, match="need 3.25 CPUs .* cluster has 2"):
        check_cluster_fits(minimal_job(), {"CPU": 2, "GPU": 1}, local=True)
    with pytest.raises(ConfigError, match="stages.model.num_gpus is 1 per model actor but the cluster has 0 GPU"):
        check_cluster_fits(minimal_job(), {"CPU": 8}, local=True)


def test_minimum_pool_sizes_count_not_maximums():
    fitting = minimal_job(
        prepare={"concurrency": [2, 32], "num_cpus": 1}, model={"concurrency": [1, 8], "num_gpus": 0, "num_cpus": 2}
    )
    check_cluster_fits(fitting, {"CPU": 5.25}, local=True)
    with pytest.raises(ConfigError, match="need 5.25 CPUs"):
        check_cluster_fits(fitting, {"CPU": 5}, local=True)


def test_fractional_requests_fit_a_small_machine():
    small = minimal_job(
        read={"num_cpus": 0.25}, prepare={"concurrency": 1, "num_cpus": 0.5}, model={"num_gpus": 0, "num_cpus": 1}
    )
    check_cluster_fits(small, {"CPU": 2}, local=True)


def test_remote_clusters_only_warn_because_they_may_autoscale(caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.runner"):
        check_cluster_fits(minimal_job(), {"CPU": 2}, local=False)
    assert "GPU" in caplog.text and "need 3.25 CPUs" in caplog.text


def test_cuda_device_without_gpus_is_a_config_error():
    with pytest.raises(ConfigError, match="model.device is cuda but stages.model.num_gpus is 0"):
        parse_job(
            {
                "name": "x",
                "input": {"urls": ["s3://b/s.tar"]},
                "output": {"url": "s3://b/out"},
                "model": {"source": "m", "device": "cuda"},
                "tasks": {"caption": {}},
                "stages": {"model": {"num_gpus": 0}},
            }
        )
