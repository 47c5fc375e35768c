"""Helpers shared by the integration tests: job dicts, uploads, reading outputs back."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds

from pipeline.testing.s3_server import LocalS3


def base_job(bucket: str, model_source: str | Path, **sections: object) -> dict[str, object]:
    job: dict[str, object] = {
        "name": "test",
        "input": {"urls": [f"s3://{bucket}/shards/shard-*.tar"]},
        "output": {"url": f"s3://{bucket}/out/"},
        "model": {"source": str(model_source), "device": "cpu"},
        "tasks": {"caption": {"max_new_tokens": 4}},
        "stages": {
            "read": {"num_cpus": 0.25},
            "prepare": {"concurrency": 1, "num_cpus": 0.5, "batch_size": 8},
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


def upload(s3: LocalS3, local: Path, remote: str) -> None:
    fs = s3.filesystem()
    if local.is_dir():
        fs.put(str(local), remote, recursive=True)
    else:
        fs.put_file(str(local), remote)
