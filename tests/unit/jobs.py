"""A minimal valid job for unit tests that need a `JobConfig` but no real shards or model."""

from __future__ import annotations

from pipeline.config import JobConfig


def minimal_job(*, failures: dict[str, object] | None = None, **stages: object) -> JobConfig:
    """A captioning job on local paths, with `stages:` sections as given (e.g. `prepare={"in_model_actors": True}`)
    and `failures:` limits."""
    return JobConfig.model_validate(
        {
            "name": "j",
            "input": {"urls": ["/data/shard-*.tar"]},
            "output": {"url": "/data/out/"},
            "model": {"source": "/models/m"},
            "tasks": {"caption": {}},
            "stages": stages,
            "failures": failures or {},
        }
    )
