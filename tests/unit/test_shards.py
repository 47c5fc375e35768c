"""Unit tests for pipeline.shards: pattern expansion on a local temp dir and output naming."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import StorageConfig
from pipeline.errors import ConfigError
from pipeline.shards import Shard, expand_shards, output_name, static_prefix

STORAGE = StorageConfig()


def touch(root: Path, *relative: str, size: int = 3) -> None:
    for name in relative:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)


def names(shards: list[Shard]) -> list[str]:
    return [s.name for s in shards]


def urls(root: Path, *relative: str) -> list[str]:
    return [f"file://{root}/{r}" for r in relative]


# --- static_prefix ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "prefix"),
    [
        ("s3://b/data/**/*.tar", "s3://b/data/"),
        ("s3://b/data/shard-{00000..00009}.tar", "s3://b/data/"),
        ("s3://b/data/2026-*/x.tar", "s3://b/data/"),
        ("s3://b/data/da?a/x.tar", "s3://b/data/"),
        ("s3://b/data/d[ab]/x.tar", "s3://b/data/"),
        ("/local/dir/shard.tar", "/local/dir/"),
        ("/local/{a,b}/shard.tar", "/local/"),
        ("shard-*.tar", ""),
        ("plain.tar", ""),
    ],
)
def test_static_prefix_cuts_back_to_the_directory_before_the_first_wildcard(pattern: str, prefix: str) -> None:
    assert static_prefix(pattern) == prefix


# --- output_name -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("relative", "name"),
    [
        ("shard-00001.tar", "shard-00001"),
        ("shard-00001.TAR", "shard-00001"),
        ("shard.tgz", "shard"),
        ("shard.tar.gz", "shard"),
        ("2026-11-01/shard-7.tar", "2026-11-01/shard-7"),
        ("a/b/c/deep.tar.gz", "a/b/c/deep"),
        ("./a/./b.tar", "a/b"),
        ("a//b.tar", "a/b"),
        ("no-suffix", "no-suffix"),
        ("double.tar.gz.tar", "double.tar.gz"),
    ],
)
def test_output_name_strips_one_tar_suffix_and_keeps_subdirectories(relative: str, name: str) -> None:
    assert output_name(relative) == name


@pytest.mark.parametrize("relative", ["../escape.tar", "a/../../b.tar", "a/../b.tar", "", ".tar", "/", "./"])
def test_output_name_rejects_unsafe_or_empty_names(relative: str) -> None:
    with pytest.raises(ValueError, match="cannot derive a safe output name"):
        output_name(relative)


# --- expand_shards ---------------------------------------------------------------------------------


def test_brace_range_expands_to_sorted_shards_with_sizes(tmp_path: Path) -> None:
    touch(tmp_path, "s-02.tar", "s-00.tar", "s-01.tar")
    touch(tmp_path, "s-03.tar", size=7)
    shards = expand_shards([f"{tmp_path}/s-{{00..03}}.tar"], STORAGE)
    assert [s.url for s in shards] == urls(tmp_path, "s-00.tar", "s-01.tar", "s-02.tar", "s-03.tar")
    assert names(shards) == ["s-00", "s-01", "s-02", "s-03"]
    assert [s.size for s in shards] == [3, 3, 3, 7]


def test_glob_matches_only_files_that_fit(tmp_path: Path) -> None:
    touch(tmp_path, "s-1.tar", "s-2.tar", "other.tar", "s-3.txt")
    shards = expand_shards([f"{tmp_path}/s-*.tar"], STORAGE)
    assert [s.url for s in shards] == urls(tmp_path, "s-1.tar", "s-2.tar")


def test_double_star_glob_reaches_nested_dirs_and_names_keep_subdirectories(tmp_path: Path) -> None:
    touch(tmp_path, "root.tar", "2026-01/x.tar", "2026-02/deep/y.tar", "2026-02/notes.txt")
    shards = expand_shards([f"{tmp_path}/**/*.tar"], STORAGE)
    assert [s.url for s in shards] == urls(tmp_path, "2026-01/x.tar", "2026-02/deep/y.tar", "root.tar")
    assert names(shards) == ["2026-01/x", "2026-02/deep/y", "root"]


def test_glob_in_a_directory_component_keeps_that_directory_in_the_name(tmp_path: Path) -> None:
    touch(tmp_path, "day-1/s.tar", "day-2/s.tar")
    shards = expand_shards([f"{tmp_path}/day-*/s.tar"], STORAGE)
    assert names(shards) == ["day-1/s", "day-2/s"]


def test_file_url_glob_is_expanded(tmp_path: Path) -> None:
    touch(tmp_path, "a.tar", "b.tgz", "c.tar.gz")
    shards = expand_shards([f"file://{tmp_path}/*"], STORAGE)
    assert [s.url for s in shards] == urls(tmp_path, "a.tar", "b.tgz", "c.tar.gz")
    assert names(shards) == ["a", "b", "c"]


def test_literal_paths_are_checked_and_named_by_basename(tmp_path: Path) -> None:
    touch(tmp_path, "one/a.tar", "two/b.tar")
    shards = expand_shards([f"{tmp_path}/two/b.tar", f"{tmp_path}/one/a.tar"], STORAGE)
    assert [s.url for s in shards] == urls(tmp_path, "one/a.tar", "two/b.tar")
    assert names(shards) == ["a", "b"]
    assert [s.size for s in shards] == [3, 3]


def test_patterns_are_merged_into_one_sorted_list(tmp_path: Path) -> None:
    touch(tmp_path, "b/0.tar", "a/2.tar", "a/1.tar")
    shards = expand_shards([f"{tmp_path}/b/*.tar", f"{tmp_path}/a/*.tar"], STORAGE)
    assert [s.url for s in shards] == urls(tmp_path, "a/1.tar", "a/2.tar", "b/0.tar")
    assert names(shards) == ["1", "2", "0"]


def test_shard_matched_by_two_patterns_appears_once(tmp_path: Path) -> None:
    touch(tmp_path, "s-00.tar", "s-01.tar", "s-02.tar")
    shards = expand_shards([f"{tmp_path}/s-01.tar", f"{tmp_path}/s-0*.tar", f"{tmp_path}/s-{{00..01}}.tar"], STORAGE)
    assert [s.url for s in shards] == urls(tmp_path, "s-00.tar", "s-01.tar", "s-02.tar")
    assert names(shards) == ["s-00", "s-01", "s-02"]


def test_pattern_matching_nothing_is_an_error_quoting_the_pattern(tmp_path: Path) -> None:
    touch(tmp_path, "s-00.tar")
    pattern = f"{tmp_path}/nothing-*.tar"
    with pytest.raises(ConfigError) as info:
        expand_shards([f"{tmp_path}/s-00.tar", pattern], STORAGE)
    assert str(info.value) == f"input.urls: no shards match {pattern!r}"


def test_partly_missing_brace_range_lists_the_missing_shards(tmp_path: Path) -> None:
    touch(tmp_path, "s-00.tar", "s-02.tar")
    with pytest.raises(ConfigError) as info:
        expand_shards([f"{tmp_path}/s-{{00..03}}.tar"], STORAGE)
    message = str(info.value)
    assert message.startswith("input.urls: 2 of 4 shard(s) do not exist: ")
    assert f"file://{tmp_path}/s-01.tar" in message
    assert f"file://{tmp_path}/s-03.tar" in message
    assert "s-00.tar" not in message and "s-02.tar" not in message


def test_long_missing_list_is_cut_after_five(tmp_path: Path) -> None:
    touch(tmp_path, "s-00.tar")
    with pytest.raises(ConfigError) as info:
        expand_shards([f"{tmp_path}/s-{{00..09}}.tar"], STORAGE)
    message = str(info.value)
    assert message.startswith("input.urls: 9 of 10 shard(s) do not exist: ")
    assert message.endswith(" and 4 more")
    assert "s-05.tar" in message and "s-06.tar" not in message


def test_brace_range_in_a_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"3 of 3 shard\(s\) do not exist"):
        expand_shards([f"{tmp_path}/absent/s-{{0..2}}.tar"], STORAGE)


def test_directory_named_like_a_shard_is_not_a_shard(tmp_path: Path) -> None:
    (tmp_path / "dir.tar").mkdir()
    with pytest.raises(ConfigError, match="1 of 1 shard"):
        expand_shards([f"{tmp_path}/dir.tar"], STORAGE)


def test_two_shards_with_the_same_output_name_are_an_error(tmp_path: Path) -> None:
    touch(tmp_path, "one/x.tar", "two/x.tar")
    with pytest.raises(ConfigError) as info:
        expand_shards([f"{tmp_path}/one/x.tar", f"{tmp_path}/two/x.tar"], STORAGE)
    message = str(info.value)
    assert message.startswith("input.urls: 1 output name(s) would be shared by different shards, e.g. 'x' by ")
    assert f"file://{tmp_path}/one/x.tar" in message and f"file://{tmp_path}/two/x.tar" in message


def test_tar_and_tgz_of_the_same_stem_clash(tmp_path: Path) -> None:
    touch(tmp_path, "s.tar", "s.tgz")
    with pytest.raises(ConfigError, match="output name"):
        expand_shards([f"{tmp_path}/s.*"], STORAGE)


def test_unbalanced_braces_are_reported(tmp_path: Path) -> None:
    touch(tmp_path, "s-0.tar")
    pattern = f"{tmp_path}/s-{{0..1.tar"
    with pytest.raises(ConfigError) as info:
        expand_shards([pattern], STORAGE)
    assert repr(pattern) in str(info.value)
