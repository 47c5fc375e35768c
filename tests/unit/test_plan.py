"""Pre-run checks that need no Ray: the tag vocabulary and the output location."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import RetryConfig, StorageConfig
from pipeline.errors import ConfigError
from pipeline.jobfile import parse_job
from pipeline.layout import OutputLayout
from pipeline.plan import _load_vocabulary


def check_output(url: str, *, write_probe: bool) -> None:
    OutputLayout(url, StorageConfig(), RetryConfig()).check_writable(write_probe=write_probe)


def tags_job(vocabulary: str):
    return parse_job(
        {
            "name": "tags",
            "input": {"urls": ["/data/s.tar"]},
            "output": {"url": "/out"},
            "model": {"source": "m"},
            "tasks": {"tags": {"vocabulary": vocabulary}},
        }
    )


def test_vocabulary_is_read_and_normalized(tmp_path: Path) -> None:
    path = tmp_path / "vocab.txt"
    path.write_text("# colours\nRed\n  Blue Car \n\nred\n")
    assert _load_vocabulary(tags_job(str(path)), StorageConfig()) == frozenset({"red", "blue car"})


def test_missing_vocabulary_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tasks\.tags\.vocabulary: .*missing\.txt: not found"):
        _load_vocabulary(tags_job(str(tmp_path / "missing.txt")), StorageConfig())


def test_empty_vocabulary_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_text("# nothing but comments\n\n")
    with pytest.raises(ConfigError, match="holds no tags"):
        _load_vocabulary(tags_job(str(path)), StorageConfig())


def test_output_check_probes_a_writable_directory_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "new" / "out"
    check_output(str(out), write_probe=True)
    assert [p for p in out.rglob("*") if p.is_file()] == []


def test_read_only_output_check_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "new" / "out"
    check_output(str(out), write_probe=False)
    assert not out.exists()


def test_unwritable_output_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="output.url: cannot write under"):
        check_output(str(blocker / "out"), write_probe=True)
