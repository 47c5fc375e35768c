"""The output layout: the one place that knows what lives where under an output prefix."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.config import RetryConfig, StorageConfig
from pipeline.errors import ConfigError
from pipeline.layout import OutputLayout


def layout(tmp_path: Path) -> OutputLayout:
    return OutputLayout(str(tmp_path / "out"), StorageConfig(), RetryConfig())


def test_paths_are_named_after_the_shard_and_the_run(tmp_path: Path) -> None:
    out = layout(tmp_path)
    root = str(tmp_path / "out")
    assert out.data_path("a/s-0") == f"{root}/a/s-0.parquet"
    assert out.staging_path("run-1", "a/s-0") == f"{root}/_staging/run-1/a/s-0.parquet"
    assert out.marker_path("a/s-0") == f"{root}/_done/a/s-0.json"
    assert out.summary_path("run-1") == f"{root}/_runs/run-1.json"
    assert out.summary_url("run-1") == f"{root}/_runs/run-1.json"


def test_markers_are_listed_by_shard_name_and_read_back(tmp_path: Path) -> None:
    out = layout(tmp_path)
    assert out.committed() == {}
    out.write_marker("a/s-0", {"rows": 3})
    out.write_marker("s-1", {"rows": 1})
    assert sorted(out.committed()) == ["a/s-0", "s-1"]
    assert out.read_marker("a/s-0") == {"rows": 3}


def test_stage_then_publish_leaves_only_the_data_file_once_staging_is_discarded(tmp_path: Path) -> None:
    out = layout(tmp_path)
    table = pa.table({"key": ["k0", "k1"]})
    staged = out.stage("run-1", "s-0", table, "zstd")
    final = out.publish(staged, "s-0").path
    out.discard(out.staging_dir("run-1"), recursive=True)
    assert final == out.data_path("s-0")
    assert out.read_data("s-0").column("key").to_pylist() == ["k0", "k1"]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == ["out/s-0.parquet"]


def test_summary_is_written_where_its_url_says(tmp_path: Path) -> None:
    out = layout(tmp_path)
    url = out.write_summary("run-1", "{}\n")
    assert Path(url).read_text() == "{}\n"


def test_writability_probe_leaves_nothing_and_a_blocked_prefix_is_a_config_error(tmp_path: Path) -> None:
    layout(tmp_path).check_writable(write_probe=True)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    (tmp_path / "blocker").write_text("a file, not a directory")
    with pytest.raises(ConfigError, match="output.url: cannot write under"):
        OutputLayout(str(tmp_path / "blocker" / "out"), StorageConfig(), RetryConfig()).check_writable(write_probe=True)
