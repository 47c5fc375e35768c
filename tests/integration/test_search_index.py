"""The search index against the local S3 server, outputs and index both on it.

Committed output files are written the way the driver commits them (stage, publish, marker last, through
`OutputLayout`) from literal rows whose embeddings are real: image vectors from a tiny CLIP over real images, and
caption vectors from the packaged all-MiniLM-L6-v2. So no run (and no Ray) is needed to get an index's inputs, and
the searches below are answered by the same models the index recorded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from support import run_cli

from pipeline.config import RetryConfig, StorageConfig
from pipeline.embedders import EmbeddingSpace, ImageTextEmbedder, TextEmbedder, packaged_text_model
from pipeline.images import decode_image
from pipeline.index import IndexLocation, ingest
from pipeline.layout import OutputLayout
from pipeline.search import SearchError, open_index
from pipeline.storage import resolve_storage
from pipeline.testing.images import rgb_jpeg
from pipeline.testing.outputs import commit_file, enrichment_table
from pipeline.testing.tiny_clip import build_tiny_clip

CAPTIONS = {
    "red": "a red star on a blue background",
    "green": "a green circle on a white background",
    "yellow": "a yellow triangle on a black background",
    "purple": "a purple square on a grey background",
}
COLOURS = {"red": (220, 20, 20), "green": (20, 200, 40), "yellow": (240, 230, 20), "purple": (130, 30, 160)}


class Models:
    """The embedding models the literal files' vectors come from, and the spaces their metadata declares."""

    def __init__(self, clip_dir: Path, text: TextEmbedder | None = None):
        self.clip_dir = clip_dir
        self.clip = ImageTextEmbedder(clip_dir)
        self.text_dir = packaged_text_model()
        self.text = text or TextEmbedder(self.text_dir)
        self.spaces = {
            "image_embedding": EmbeddingSpace(str(clip_dir), self.clip.dimension),
            "caption_embedding": EmbeddingSpace(str(self.text_dir), self.text.dimension),
        }


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return Models(build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip"))


def images_of(colours: list[str], shade: int) -> list[bytes]:
    return [rgb_jpeg(48, 48, tuple(max(0, c - shade) for c in COLOURS[name])) for name in colours]


def shard_table(models: Models, shard: str, colours: list[str], *, shade: int = 0, errors=None, embeddings=True):
    keys = [f"{shard}-{i:02d}-{name}" for i, name in enumerate(colours)]
    captions = [CAPTIONS[name] for name in colours]
    vectors = None
    if embeddings:
        pictures = [decode_image(data, max_pixels=10**6).image for data in images_of(colours, shade)]
        vectors = {
            "image_embedding": models.clip.embed_images(pictures),
            "caption_embedding": models.text.embed(captions),
        }
    return enrichment_table(
        shard=f"s3://in/shards/{shard}.tar",
        keys=keys,
        captions=captions,
        tags=[name.split() + ["shape"] for name in colours],
        errors=errors,
        metadata=[json.dumps({"colour": name}) for name in colours],
        vectors=vectors,
        spaces=models.spaces if embeddings else None,
    )


class Prefix:
    """A bucket holding an output prefix, its job file and its layout."""

    def __init__(self, s3, tmp: Path):
        self.bucket = f"ix-{uuid.uuid4().hex[:10]}"
        s3.create_bucket(self.bucket)
        self.output = f"s3://{self.bucket}/out"
        self.index = f"{self.output}/_index"
        self.layout = OutputLayout(self.output, resolve_storage(StorageConfig()), RetryConfig())
        job = {
            "name": "index-test",
            "input": {"urls": [f"s3://{self.bucket}/shards/shard-*.tar"]},
            "output": {"url": self.output},
            "model": {"source": "unused-model"},
            "tasks": {"caption": {}},
        }
        self.job = tmp / f"{self.bucket}.yaml"
        self.job.write_text(yaml.safe_dump(job))

    def ingest(self, **options):
        return ingest(self.layout, IndexLocation.of(self.index), echo=lambda line: None, **options)

    def index_rows(self):
        table = open_index(self.index).table.to_arrow()
        return Counter(zip(table.column("shard_name").to_pylist(), table.column("key").to_pylist()))

    def indexable_keys(self) -> Counter:
        """(shard name, key) of every successful row in the committed files: what the index must hold, once."""
        wanted: Counter = Counter()
        for name in self.layout.committed():
            table = self.layout.read_data(name, columns=["key", "error"])
            for key, error in zip(table.column("key").to_pylist(), table.column("error").to_pylist()):
                if error is None:
                    wanted[(name, key)] += 1
        return wanted


@pytest.fixture(scope="module")
def indexed(s3, models, tmp_path_factory):
    """Two shards with embeddings (one with a failed sample) and one v2 shard without, indexed once via the CLI."""
    prefix = Prefix(s3, tmp_path_factory.mktemp("jobs"))
    commit_file(
        prefix.layout, "shard-000", shard_table(models, "shard-000", ["red", "green"], errors=[None, "decode failed"])
    )
    commit_file(prefix.layout, "shard-001", shard_table(models, "shard-001", ["yellow", "purple", "red"], shade=30))
    commit_file(prefix.layout, "shard-002", shard_table(models, "shard-002", ["green", "yellow"], embeddings=False))
    return prefix


def test_index_command_adds_committed_shards_then_skips_them(indexed, capsys):
    first = run_cli(capsys, "index", str(indexed.job))
    assert first.exit_code == 0, first.stderr
    assert "3 added, 0 replaced, 0 unchanged (skipped), 0 refused" in first.stdout
    assert "1 failed sample(s) left out" in first.stdout
    assert "1 shard(s) have no embeddings" in first.stdout and "full-text search only" in first.stdout
    assert indexed.index_rows() == indexed.indexable_keys()
    assert ("shard-000", "shard-000-01-green") not in indexed.index_rows()  # the failed sample

    version = open_index(indexed.index).table.version
    again = run_cli(capsys, "index", str(indexed.job), "--json")
    assert again.exit_code == 0
    figures = json.loads(again.stdout)
    assert (figures["added"], figures["replaced"], figures["skipped"]) == ([], [], 3)
    assert open_index(indexed.index).table.version == version  # nothing written


def test_searches_by_text_caption_and_image(indexed, models, s3, capsys, tmp_path):
    run_cli(capsys, "index", str(indexed.job))
    index = open_index(indexed.index)
    assert index.default_mode() == "image"

    words = index.search("triangle", mode="text", k=5)
    assert {hit.key for hit in words} == {"shard-001-00-yellow", "shard-002-01-yellow"}  # the v2 shard's too

    paraphrase = index.search("a crimson star", mode="caption", k=2)
    assert all("red star" in hit.caption for hit in paraphrase), paraphrase

    query = tmp_path / "query.jpg"
    query.write_bytes(images_of(["purple"], 30)[0])  # shard-001's purple image, byte for byte
    similar = run_cli(
        capsys, "search", indexed.index, "--image", str(query), "-k", "3", "--json", "--endpoint-url", s3.endpoint_url
    )
    assert similar.exit_code == 0, similar.stderr
    hits = json.loads(similar.stdout)
    assert hits[0]["key"] == "shard-001-01-purple" and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)

    others = index.search(image=query.read_bytes(), k=1, where="key != 'shard-001-01-purple'")
    assert others[0].key != "shard-001-01-purple" and others[0].score < 0.9999  # the query itself filtered out

    through_clip = index.search("a red star", mode="image", k=4)  # a random tiny CLIP: any 4 images, scored
    assert len(through_clip) == 4 and all(-1.0001 <= hit.score <= 1.0001 for hit in through_clip)
    hybrid = run_cli(capsys, "search", indexed.index, "green circle", "--mode", "hybrid", "-k", "3")
    assert hybrid.exit_code == 0, hybrid.stderr
    assert "shard-002/shard-002-00-green" in hybrid.stdout  # the words' only match, fused with the vectors' hits


def test_changed_file_replaces_its_rows(s3, models, tmp_path):
    prefix = Prefix(s3, tmp_path)
    commit_file(prefix.layout, "shard-000", shard_table(models, "shard-000", ["red", "green", "yellow"]))
    commit_file(prefix.layout, "shard-001", shard_table(models, "shard-001", ["purple"]))
    assert prefix.ingest().added == ["shard-000", "shard-001"]

    # As retry-failed or --overwrite would: the shard's file rewritten (one sample gone, one failed), marker last.
    commit_file(
        prefix.layout,
        "shard-000",
        shard_table(models, "shard-000", ["red", "green"], errors=[None, "model ran out of memory"]),
    )
    report = prefix.ingest()
    assert (report.added, report.replaced, report.skipped) == ([], ["shard-000"], 1)
    assert prefix.index_rows() == prefix.indexable_keys()
    assert set(prefix.index_rows()) == {("shard-000", "shard-000-00-red"), ("shard-001", "shard-001-00-purple")}


def test_killed_build_rerun_holds_every_key_once(s3, models, tmp_path):
    prefix = Prefix(s3, tmp_path)
    for number in range(3):
        colours = ["red", "green", "yellow", "purple"][number:]
        commit_file(prefix.layout, f"shard-{number:03d}", shard_table(models, f"shard-{number:03d}", colours))
    faults = {"state_dir": str(tmp_path / "faults"), "rules": {"index.merged": {"action": "kill", "skip": 1}}}
    killed = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "index", str(prefix.job)],
        env={**os.environ, "LLAVA_PIPELINE_FAULTS": json.dumps(faults)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -9, killed.stderr  # SIGKILL after the second shard's merge, before its record
    rows = prefix.index_rows()
    assert rows and max(rows.values()) == 1 and len({shard for shard, _ in rows}) == 2

    report = prefix.ingest()
    assert report.skipped == 1 and report.added == ["shard-001", "shard-002"]
    assert prefix.index_rows() == prefix.indexable_keys()


def test_other_embedding_model_is_refused_before_any_write(s3, models, tmp_path, capsys):
    prefix = Prefix(s3, tmp_path)
    commit_file(prefix.layout, "shard-000", shard_table(models, "shard-000", ["red", "green"]))
    prefix.ingest()
    version = open_index(prefix.index).table.version

    other = EmbeddingSpace("openai/clip-vit-base-patch32", 16)  # what the file declares is what is checked
    rows = enrichment_table(
        shard="s3://in/shards/shard-001.tar",
        keys=["shard-001-00-yellow"],
        captions=[CAPTIONS["yellow"]],
        vectors={"image_embedding": np.ones((1, 16), np.float32) / 4},
        spaces={"image_embedding": other},
    )
    commit_file(prefix.layout, "shard-001", rows)

    result = run_cli(capsys, "index", str(prefix.job))
    assert result.exit_code == 1
    refusal = next(line for line in result.stdout.splitlines() if "refused  shard-001" in line)
    assert "from openai/clip-vit-base-patch32 (16 dimensions)" in refusal
    assert f"from {models.clip_dir} (32 dimensions)" in refusal
    assert "nothing of them was written" in result.stderr
    assert open_index(prefix.index).table.version == version
    assert {shard for shard, _ in prefix.index_rows()} == {"shard-000"}


def test_index_of_v2_outputs_serves_full_text_only(s3, models, tmp_path):
    prefix = Prefix(s3, tmp_path)
    commit_file(prefix.layout, "shard-000", shard_table(models, "shard-000", ["red", "green"], embeddings=False))
    report = prefix.ingest()
    assert report.full_text_only == ["shard-000"] and report.rows_indexed == 2
    index = open_index(prefix.index)
    assert index.spaces == {} and index.default_mode() == "text"
    assert [hit.key for hit in index.search("star")] == ["shard-000-00-red"]
    with pytest.raises(SearchError, match="has no image embeddings .* search it with mode text"):
        index.search("a red star", mode="image")


def test_search_errors_exit_2(indexed, s3, capsys, tmp_path):
    missing = run_cli(capsys, "search", f"s3://{indexed.bucket}/elsewhere/_index", "star")
    assert missing.exit_code == 2 and "no search index at" in missing.stderr
    local = run_cli(capsys, "search", str(tmp_path / "nothing"), "star")
    assert local.exit_code == 2 and "no search index at" in local.stderr
    assert not (tmp_path / "nothing").exists()

    run_cli(capsys, "index", str(indexed.job))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = run_cli(capsys, "search", indexed.index, "--image", str(broken))
    assert result.exit_code == 2 and f"cannot decode the query image {broken}" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_with_update_after_run_updates_the_index(s3, models, tmp_path, capsys):
    """A run with nothing left to do still updates the index (no Ray is started for it)."""
    prefix = Prefix(s3, tmp_path)
    s3.filesystem().pipe(f"{prefix.bucket}/shards/shard-000.tar", b"listed, never read: its output is committed")
    commit_file(prefix.layout, "shard-000", shard_table(models, "shard-000", ["yellow"]))
    job = yaml.safe_load(prefix.job.read_text())
    job["index"] = {"update_after_run": True}
    prefix.job.write_text(yaml.safe_dump(job))
    result = run_cli(capsys, "run", str(prefix.job), runner_importable=True)
    assert result.exit_code == 0, result.stderr
    assert "nothing to do" in result.stdout and "1 added" in result.stdout
    assert prefix.index_rows() == prefix.indexable_keys()
    assert np.isclose(open_index(prefix.index).search(image=images_of(["yellow"], 0)[0])[0].score, 1.0, atol=1e-4)


def test_racing_commits_on_the_local_s3_keep_both(s3, tmp_path):
    """LanceDB commits a table version with a conditional PUT (If-None-Match); the local S3 server honours it, so
    of two writers that both start from version N, the second sees the conflict and retries on N+1."""
    import pyarrow as pa

    location = IndexLocation.of(f"s3://{Prefix(s3, tmp_path).bucket}/race")
    table = location.connect().create_table("t", pa.table({"key": ["a"]}))
    first, second = location.connect().open_table("t"), location.connect().open_table("t")
    first.add(pa.table({"key": ["b"]}))
    second.add(pa.table({"key": ["c"]}))
    assert sorted(location.connect().open_table("t").to_arrow().column("key").to_pylist()) == ["a", "b", "c"]
    assert table.version == 1
