"""An output prefix that can be audited and trusted: `verify`, resume repairing what its markers no longer
vouch for, and one writer per prefix (the lease).

One committed prefix (three tiny shards, one run) serves every test here, in order: the lease tests only
need a run to get past the lease (a finished prefix has nothing to do, so no model loads), and the last
test damages the prefix, audits it, repairs it with a resume and audits it again.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import pyarrow.parquet as pq
import pytest
import yaml
from support import assert_exactly_once, base_job, read_output, run_cli, upload

from pipeline.cli import main
from pipeline.config import JobConfig, LeaseConfig
from pipeline.layout import OutputLayout
from pipeline.lease import LeaseHeld, LeaseLost, OutputLease, read_lease
from pipeline.schema import BASE_VERSION
from pipeline.storage import resolve_storage
from pipeline.testing.shards import write_shards

# The killed holder's lease, short so that it lapses within the test (the runs keep the default lease: a
# heartbeat every fraction of a second could be late on a busy machine).
SHORT_LEASE = {"expiry_s": 2, "heartbeat_s": 0.5}


@pytest.fixture(scope="module")
def committed(s3, ray_address, tiny_model, tmp_path_factory) -> dict[str, object]:
    """A prefix with three committed shards of two samples, written by one `llava-pipeline run`."""
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(bucket)
    here = tmp_path_factory.mktemp("integrity")
    shards = write_shards(here / "shards", shards=3, samples_per_shard=2, seed=5)
    for path in shards:
        upload(s3, path, f"{bucket}/shards/{path.name}")
    job = base_job(bucket, tiny_model)
    job_path = here / "job.yaml"
    job_path.write_text(yaml.safe_dump(job))
    assert main(["run", str(job_path), "--no-progress-bars"]) == 0
    return {"bucket": bucket, "url": f"s3://{bucket}/out/", "job": job, "job_path": str(job_path), "shards": shards}


def layout_of(committed) -> OutputLayout:
    job = JobConfig.model_validate(committed["job"])
    return OutputLayout(job.output.url, resolve_storage(job.storage_for("output")), job.retries)


def hold_lease(committed, run_id: str, config: LeaseConfig) -> OutputLease:
    """The lease taken as a run takes it, by a holder that is not a full run."""
    return OutputLease(layout_of(committed), run_id=run_id, command="run", job_name="nightly", config=config).acquire()


def test_verify_passes_a_prefix_a_run_committed(capsys, s3, committed):
    result = run_cli(capsys, "verify", committed["url"])
    assert result.exit_code == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"verify {committed['url']}: ok")
    assert f"files     3 (6 rows, schema llava-pipeline/enrichment v{BASE_VERSION})" in result.stdout
    marker = json.loads(s3.filesystem().cat_file(f"{committed['bucket']}/out/_done/shard-00000.json"))
    data = s3.filesystem().cat_file(f"{committed['bucket']}/out/shard-00000.parquet")
    assert marker["bytes"] == len(data) and marker["rows"] == 2 and marker["etag"]


def test_a_second_writer_exits_2_naming_the_holder_and_force_unlock_takes_over(capsys, committed):
    holder = hold_lease(committed, "nightly-holder-run", LeaseConfig(expiry_s=60, heartbeat_s=0.2))
    try:
        for command in ("run", "retry-failed"):
            # The runner cannot even be imported: the second writer stops before any work.
            second = run_cli(capsys, command, committed["job_path"], runner_importable=False)
            assert second.exit_code == 2, second.stderr
            assert "being written by run nightly-holder-run" in second.stderr, second.stderr
            assert f"expires at {read_lease(layout_of(committed)).expires_at[:16]}" in second.stderr
            assert "--force-unlock" in second.stderr
        holder.assert_held()
        check = run_cli(capsys, "validate", committed["job_path"], runner_importable=False)
        assert check.exit_code == 0 and "lease   held by run nightly-holder-run" in check.stdout, check.stdout

        forced = run_cli(capsys, "run", committed["job_path"], "--force-unlock")
        assert forced.exit_code == 0, forced.stderr
        assert "nothing to do" in forced.stdout
        # The broken holder learns at its next heartbeat (its lease taken, or by now given back) and may not
        # commit again.
        deadline = time.monotonic() + 5
        while holder._lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(LeaseLost, match="run nightly-holder-run stopped writing: its lease on .* was"):
            holder.assert_held()
    finally:
        holder.release()
    assert read_lease(layout_of(committed)) is None, "the forcing run gave its lease back"


HOLD_AND_WAIT = """
import sys, time
from pipeline.config import JobConfig
from pipeline.lease import output_lease
job = JobConfig.model_validate_json(sys.argv[1])
with output_lease(job, run_id="killed-run", command="run"):
    print("holding", flush=True)
    time.sleep(600)
"""


def test_a_killed_runs_lease_lapses_and_the_next_run_proceeds(capsys, committed):
    short_lease_job = base_job(committed["bucket"], "unused", output={"lease": SHORT_LEASE})
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_AND_WAIT, json.dumps(short_lease_job)],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    blocked = run_cli(capsys, "run", committed["job_path"], runner_importable=False)
    assert blocked.exit_code == 2 and "killed-run" in blocked.stderr, blocked.stderr

    lapse = read_lease(layout_of(committed)).expires
    time.sleep(max(0.0, (lapse - datetime.now(timezone.utc)).total_seconds()) + 0.1)
    after = run_cli(capsys, "run", committed["job_path"])
    assert after.exit_code == 0, after.stderr
    assert "nothing to do" in after.stdout
    assert read_lease(layout_of(committed)) is None


def test_verify_reports_damage_and_a_resume_repairs_it(capsys, s3, committed):
    fs = s3.filesystem()
    out = f"{committed['bucket']}/out"
    # A lifecycle rule deleted one file; a bad sync left another with a row short; a commit killed before
    # its marker left a file no marker vouches for; a killed run left its staged file.
    fs.rm(f"{out}/shard-00000.parquet")
    short = pq.read_table(io.BytesIO(fs.cat_file(f"{out}/shard-00001.parquet")))
    sink = io.BytesIO()
    pq.write_table(short.slice(0, 1), sink)
    fs.pipe_file(f"{out}/shard-00001.parquet", sink.getvalue())
    fs.rm(f"{out}/_done/shard-00002.json")
    fs.copy(f"{out}/shard-00002.parquet", f"{out}/_staging/20260101T000000Z-dead00/shard-00002.parquet")

    damaged = run_cli(capsys, "verify", committed["url"])
    assert damaged.exit_code == 1, damaged.stdout
    lines = damaged.stdout.splitlines()
    assert lines[0] == f"verify {committed['url']}: 7 problem(s)", damaged.stdout
    problems = [line.split(None, 1) for line in lines[lines.index("problems:") + 1 :]]
    assert [kind for kind, _ in problems] == ["missing", "changed", "changed", "changed", "changed", "orphan", "staged"]
    details = "\n".join(detail for _, detail in problems)
    for fragment in (
        "shard-00000.parquet: marked done (_done/shard-00000.json) but the data file is missing",
        "shard-00001.parquet: the file is",
        "shard-00001.parquet: the file has 1 rows, the marker recorded 2",
        "shard-00001.parquet: the file's keys are not the key set the marker recorded",
        "shard-00002.parquet: no completion marker",
        "_staging/20260101T000000Z-dead00/shard-00002.parquet: left under _staging/",
    ):
        assert fragment in details, damaged.stdout

    rerun = run_cli(capsys, "run", committed["job_path"], "--no-progress-bars")
    assert rerun.exit_code == 0, rerun.stderr
    assert "repaired  2 shard(s) marked done whose committed file was missing or changed" in rerun.stdout
    summaries = [p for p in fs.find(f"{out}/_runs") if p.endswith(".json")]
    [summary_path] = [p for p in summaries if json.loads(fs.cat_file(p)).get("repaired")]
    summary = json.loads(fs.cat_file(summary_path))
    reasons = {r["shard"].rsplit("/", 1)[1]: r["reason"] for r in summary["repaired"]}
    assert sorted(reasons) == ["shard-00000.tar", "shard-00001.tar"]
    assert reasons["shard-00000.tar"] == "its data file is missing"
    assert reasons["shard-00001.tar"].startswith(f"its data file is {len(sink.getvalue())} bytes, the marker recorded")
    assert summary["shards"]["total"] == 3  # the two repaired and the one without a marker
    assert_exactly_once(read_output(s3, committed["url"]), committed["shards"])

    clean = run_cli(capsys, "verify", committed["url"])
    assert clean.exit_code == 0, clean.stdout


def _acquire_together(lease: OutputLease, start: threading.Barrier) -> str:
    start.wait()
    try:
        lease.acquire()
        return "won"
    except LeaseHeld:
        return "refused"


def test_runs_racing_for_a_prefix_on_s3_get_one_lease_between_them(s3, bucket):
    """The conditional create on a real S3 server: of runs that start at the same instant, one gets the lease."""
    job = JobConfig.model_validate(base_job(bucket, "unused"))
    storage = resolve_storage(job.storage_for("output"))
    for round_ in range(3):
        leases = [
            OutputLease(
                OutputLayout(f"s3://{bucket}/race-{round_}/", storage, job.retries),
                run_id=f"run-{i}",
                command="run",
                job_name="nightly",
                config=LeaseConfig(),
            )
            for i in range(6)
        ]
        start = threading.Barrier(len(leases))
        with ThreadPoolExecutor(len(leases)) as pool:
            outcomes = list(pool.map(lambda lease, start=start: _acquire_together(lease, start), leases))
        assert sorted(outcomes) == ["refused"] * 5 + ["won"], outcomes
        winner = leases[outcomes.index("won")]
        assert read_lease(winner.layout).run_id == winner.run_id
        winner.release()
