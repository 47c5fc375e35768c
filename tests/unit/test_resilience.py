"""Failure limits, fault-drill rules, retry-failed selection in the read stage, cluster-fault detection."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, NodeDiedError

from jobs import minimal_job
from pipeline import faults, rows
from pipeline.config import InputConfig, ReadStageConfig, StorageConfig
from pipeline.runner import _failure_limits_breached, is_cluster_fault
from pipeline.shards import Shard
from pipeline.stages.read import ShardReader, read_shard
from pipeline.summary import RunStats
from pipeline.testing.shards import write_shard
from pipeline.writer import ShardResult


def stats(samples: int, failed: dict[str, int]) -> RunStats:
    run = RunStats(samples=samples, succeeded=samples - sum(failed.values()))
    run.failed_by_reason = Counter(failed)
    return run


def shard(status: str, name: str = "s") -> ShardResult:
    return ShardResult(Shard(url=f"file:///data/{name}.tar", name=name), expected=1, status=status, error="cut")


def test_defaults_allow_no_broken_shard_and_five_percent_failed_samples() -> None:
    assert _failure_limits_breached(minimal_job(), stats(100, {"corrupt_image": 5}), [shard("ok")]) is None
    too_many = _failure_limits_breached(
        minimal_job(), stats(100, {"corrupt_image": 4, "out_of_memory": 2}), [shard("ok")]
    )
    assert too_many == (
        "6 of 100 samples failed (6.0%), more than failures.max_failed_sample_fraction=0.05 "
        "(4 corrupt_image, 2 out_of_memory)"
    )
    broken = _failure_limits_breached(minimal_job(), stats(10, {}), [shard("ok"), shard("partial", "t")])
    assert broken == (
        "1 shard(s) failed or ended early, more than failures.max_failed_shards=0 (e.g. file:///data/t.tar: cut)"
    )


def test_limits_can_be_raised_or_lifted() -> None:
    lenient = minimal_job(failures={"max_failed_shards": 2, "max_failed_sample_fraction": None})
    assert (
        _failure_limits_breached(lenient, stats(10, {"corrupt_image": 9}), [shard("failed"), shard("partial")]) is None
    )
    assert "max_failed_shards=2" in _failure_limits_breached(lenient, stats(1, {}), [shard("failed")] * 3)


def test_fault_rules_fire_in_order_bounded_across_processes(tmp_path: Path, monkeypatch) -> None:
    rules = {"model.batch": [{"action": "raise", "times": 2, "skip": 1}, {"action": "oom", "min_batch": 8}]}
    monkeypatch.setenv(faults.ENV, json.dumps({"state_dir": str(tmp_path), "rules": rules}))
    faults.inject("model.batch", batch=4)  # skipped: the first hit in this process
    for _ in range(2):
        with pytest.raises(RuntimeError, match="injected failure at model.batch"):
            faults.inject("model.batch", batch=4)
    faults.inject("model.batch", batch=4)  # the raise rule is spent; the oom rule wants batches of 8
    with pytest.raises(MemoryError):
        faults.inject("model.batch", batch=8)
    assert (faults.fired(tmp_path, "model.batch", 0), faults.fired(tmp_path, "model.batch", 1)) == (2, 1)
    faults.inject("model.load")  # no rule for this point


def test_delay_rule_sleeps_until_its_release_file_appears(tmp_path: Path, monkeypatch) -> None:
    release = tmp_path / "release"
    rules = {"model.batch": {"action": "delay", "seconds": 0.3, "times": -1, "until_file": str(release)}}
    monkeypatch.setenv(faults.ENV, json.dumps({"state_dir": str(tmp_path), "rules": rules}))
    started = time.monotonic()
    faults.inject("model.batch", batch=1)  # slow, and then goes on: no exception
    assert time.monotonic() - started >= 0.3
    release.touch()
    started = time.monotonic()
    faults.inject("model.batch", batch=1)
    assert time.monotonic() - started < 0.1


def test_fault_plan_rejects_unknown_points_and_actions() -> None:
    with pytest.raises(ValueError, match="unknown fault point 'model.lod'"):
        faults.parse(json.dumps({"state_dir": "/tmp", "rules": {"model.lod": {"action": "kill"}}}))
    with pytest.raises(ValueError, match="action must be one of"):
        faults.parse(json.dumps({"state_dir": "/tmp", "rules": {"model.load": {"action": "explode"}}}))


def test_selection_reads_only_chosen_samples_keeping_their_positions(tmp_path: Path) -> None:
    path = tmp_path / "s.tar"
    write_shard(path, [{"__key__": f"k{i}", "jpg": bytes([i + 1]) * 10} for i in range(6)])
    url = f"file://{path}"
    spec = ShardReader(
        input=InputConfig(urls=[url], image_extensions=["jpg"], metadata_extension=None),
        stage=ReadStageConfig(rows_per_block=2),
        storage=StorageConfig(),
        selection={url: frozenset({"k1", "k4"})},
    )
    out = [r for block in read_shard(Shard(url=url, name="s"), spec) for r in block.to_pylist()]
    samples = [r for r in out if r[rows.RECORD] == rows.SAMPLE]
    assert [(r["key"], r[rows.INDEX]) for r in samples] == [("k1", 1), ("k4", 4)]
    assert out[-1][rows.SHARD_SAMPLES] == 2 and out[-1][rows.SHARD_STATUS] == rows.SHARD_OK


def test_lost_nodes_and_actors_are_cluster_faults() -> None:
    assert is_cluster_fault(NodeDiedError("node 1 died"))
    assert is_cluster_fault(ActorUnavailableError("connection refused", b"\x00" * 16))
    try:
        raise RuntimeError("Ray Data wraps it") from NodeDiedError("node died")
    except RuntimeError as wrapped:
        assert is_cluster_fault(wrapped)
    assert not is_cluster_fault(ValueError("bug"))
    assert is_cluster_fault(ActorDiedError())


def test_an_actor_that_died_in_its_constructor_is_not_a_cluster_fault() -> None:
    class CreationFailed(ActorDiedError):
        def __str__(self) -> str:
            return "The actor died because of an error raised in its creation task: model.load failed"

    assert not is_cluster_fault(CreationFailed())
