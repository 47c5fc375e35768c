"""One writer per output prefix, on a local prefix (the S3 conditional writes are exercised by the integration
tests against the local S3 server)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.config import LeaseConfig, RetryConfig, StorageConfig
from pipeline.layout import OutputLayout
from pipeline.lease import LeaseHeld, LeaseLost, OutputLease, read_lease

QUICK = LeaseConfig(expiry_s=1, heartbeat_s=0.05)


def lease(tmp_path: Path, run_id: str, config: LeaseConfig = QUICK) -> OutputLease:
    out = OutputLayout(str(tmp_path / "out"), StorageConfig(), RetryConfig(attempts=1))
    return OutputLease(out, run_id=run_id, command="run", job_name="nightly", config=config)


def wait_until(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_a_second_writer_is_refused_naming_the_holder_until_the_first_releases(tmp_path: Path) -> None:
    first = lease(tmp_path, "run-a").acquire()
    record = json.loads((tmp_path / "out/_lease.json").read_text())
    assert (record["run_id"], record["command"], record["job"]) == ("run-a", "run", "nightly")
    with pytest.raises(LeaseHeld, match=r"being written by run run-a \(run of job nightly on .*expires at 20"):
        lease(tmp_path, "run-b").acquire()
    first.release()
    assert not (tmp_path / "out/_lease.json").exists()
    lease(tmp_path, "run-b").acquire().release()


def test_the_heartbeat_keeps_a_live_lease_past_its_expiry(tmp_path: Path) -> None:
    first = lease(tmp_path, "run-a").acquire()
    acquired = read_lease(first.layout).expires
    time.sleep(1.2)  # longer than expiry_s
    first.assert_held()
    assert read_lease(first.layout).expires > acquired
    with pytest.raises(LeaseHeld):
        lease(tmp_path, "run-b").acquire()
    first.release()


def test_a_lease_no_one_renews_lapses_and_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    dead = {
        "run_id": "killed-run",
        "command": "run",
        "job": "nightly",
        "holder": "gone pid 1",
        "token": "t",
        "acquired_at": "2026-01-01T00:00:00.000+00:00",
        "renewed_at": "2026-01-01T00:00:00.000+00:00",
        "expires_at": "2026-01-01T00:03:00.000+00:00",
    }
    (out / "_lease.json").write_text(json.dumps(dead))
    taker = lease(tmp_path, "run-b").acquire()
    assert read_lease(taker.layout).run_id == "run-b"
    taker.release()


def test_force_unlock_takes_a_live_lease_and_its_holder_stops_at_the_next_heartbeat(tmp_path: Path) -> None:
    holder = lease(tmp_path, "run-a").acquire()
    operator = lease(tmp_path, "run-b").acquire(force_unlock=True)
    wait_until(lambda: holder._lost is not None)
    with pytest.raises(LeaseLost, match="run run-a stopped writing: its lease on .* was taken by run run-b"):
        holder.assert_held()
    holder.release()  # does not delete the new holder's lease
    assert read_lease(operator.layout).run_id == "run-b"
    operator.release()


def test_an_unreadable_lease_file_needs_force_unlock(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out/_lease.json").write_text("not json")
    with pytest.raises(LeaseHeld, match="cannot read; if no run is writing there, rerun with --force-unlock"):
        lease(tmp_path, "run-a").acquire()
    lease(tmp_path, "run-a").acquire(force_unlock=True).release()


def test_lease_settings_keep_the_heartbeat_well_inside_the_expiry() -> None:
    with pytest.raises(ValidationError, match="heartbeat_s \\(60\\) must be at most a third of expiry_s \\(120\\)"):
        LeaseConfig(expiry_s=120, heartbeat_s=60)
    with pytest.raises(ValidationError, match="expiry_s"):
        LeaseConfig(expiry_s=0.5, heartbeat_s=0.1)
