"""Helpers shared by the integration tests: job dicts, uploads, reading outputs back, checking keys,
and the CLI run in-process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from pipeline.testing.s3_server import LocalS3

# The bundled model (trained by pipeline.tools.train_shapes): answers right about the generated shapes.
SHAPES_MODEL = Path(__file__).resolve().parents[2] / "models" / "tiny-llava-shapes"

# The production layout: decoding and preprocessing in a CPU actor pool of its own, feeding the model actors.
PREPARE_POOL = {"concurrency": 1, "num_cpus": 0.5, "batch_size": 8}


def base_job(bucket: str, model_source: str | Path, **sections: object) -> dict[str, object]:
    """A small job on the local S3. Preparing runs in the model actor (`stages.prepare.in_model_actors`): one
    actor start per run instead of two, the suite's largest cost on 2 cores. Tests of the pools themselves,
    and the end-to-end and truth tests, set `stages.prepare` to `PREPARE_POOL`."""
    job: dict[str, object] = {
        "name": "test",
        "input": {"urls": [f"s3://{bucket}/shards/shard-*.tar"]},
        "output": {"url": f"s3://{bucket}/out/"},
        "model": {"source": str(model_source), "device": "cpu"},
        "tasks": {"caption": {"max_new_tokens": 4}},
        "stages": {
            "read": {"num_cpus": 0.25},
            "prepare": {"in_model_actors": True},
            "model": {"concurrency": 1, "num_gpus": 0, "num_cpus": 0.5, "batch_size": 4},
        },
        "ray": {"progress_bars": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(job.get(key), dict):
            job[key] = {**job[key], **value}  # type: ignore[dict-item]
        else:
            job[key] = value
    return job


def read_output(s3: LocalS3, url: str) -> pa.Table:
    """Every output row under a prefix, read the way a user would (pyarrow skips `_` paths)."""
    fs = s3.filesystem()
    return ds.dataset(url.removeprefix("s3://"), filesystem=fs, format="parquet").to_table()


def read_local_output(directory: Path) -> pa.Table:
    """Every output row under a local output directory (pyarrow skips `_` paths)."""
    return ds.dataset(str(directory), format="parquet").to_table()


def upload(s3: LocalS3, local: Path, remote: str) -> None:
    fs = s3.filesystem()
    if local.is_dir():
        fs.put(str(local), remote, recursive=True)
    else:
        fs.put_file(str(local), remote)


# A member's key, as webdataset groups members: its directory and its base name up to the first dot.
_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def shard_keys(paths: list[Path]) -> Counter:
    """(shard file name, key) for every sample in local shard files, as many times as the tar holds it."""
    keys: Counter = Counter()
    for path in paths:
        with tarfile.open(path) as tar:
            for key in {_MEMBER.match(member.name).group(1) for member in tar.getmembers()}:
                keys[(path.name, key)] += 1
    return keys


def output_keys(table: pa.Table) -> Counter:
    """(shard file name, key) for every output row, as many times as it was written."""
    return Counter(
        (shard.rsplit("/", 1)[-1], key) for shard, key in zip(table["shard"].to_pylist(), table["key"].to_pylist())
    )


def assert_exactly_once(table: pa.Table, shard_paths: list[Path]) -> None:
    got = output_keys(table)
    want = shard_keys(shard_paths)
    missing = want - got
    twice = {k: n for k, n in got.items() if n > 1}
    extra = got - want
    assert not missing, f"{len(missing)} key(s) missing, e.g. {sorted(missing)[:3]}"
    assert not twice, f"{len(twice)} key(s) written more than once, e.g. {sorted(twice)[:3]}"
    assert not extra, f"unexpected keys {sorted(extra)[:3]}"


@dataclass(frozen=True)
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


def run_cli(capsys: pytest.CaptureFixture[str], *args: str, runner_importable: bool = True) -> CliResult:
    """`llava-pipeline ARGS` in this process: exit code and what it printed.

    With `runner_importable=False` the runner cannot be imported, so a command that tried to start work
    fails loudly instead of answering: the check that a bad job stops before any Ray work.
    """
    from pipeline.cli import main

    capsys.readouterr()
    with pytest.MonkeyPatch.context() as patch:
        if not runner_importable:
            patch.setitem(sys.modules, "pipeline.runner", None)
        try:
            exit_code = main(list(args))
        except SystemExit as exit:  # argparse's --help and usage errors
            exit_code = exit.code if isinstance(exit.code, int) else 1
    captured = capsys.readouterr()
    return CliResult(exit_code, captured.out, captured.err)


@dataclass
class BackgroundScenario:
    """A scenario in a process of its own (its own Ray cluster), started with the session by a `background`
    test (see tests/conftest.py) and awaited by that test; `details` is what the test checks besides its output."""

    process: subprocess.Popen
    details: dict[str, object] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    wall_seconds: float | None = None

    @classmethod
    def start(cls, command: list[str], environment: dict[str, str], **details: object) -> "BackgroundScenario":
        """`command` with this process's environment, less what would reach another cluster (RAY_ADDRESS) or
        another test's fault rules, plus `environment`."""
        from pipeline import faults

        inherited = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", faults.ENV)}
        # In a session of its own: stopping it takes the cluster's processes too (killpg), not only the driver.
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**inherited, **environment},
            start_new_session=True,
        )
        return cls(process, details)

    def outcome(self, timeout: float) -> tuple[str, str]:
        """Its stdout and stderr once it ends; stopped (and what it printed kept) if it runs past `timeout`."""
        try:
            stdout, stderr = self.process.communicate(timeout=max(1.0, self.started + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.stop()
            stdout, stderr = self.process.communicate()
        self.wall_seconds = round(time.monotonic() - self.started, 1)
        return stdout, stderr

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
