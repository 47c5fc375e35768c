"""Markers that vouch for their file: the checks on literal markers, listings and bytes, `verify`'s audit of
a local prefix committed by the real committer, and resume's choice of shards to repair."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_writer import SCHEMA, batch, committer, layout, make_shard, sample, shard_end

from pipeline import integrity
from pipeline.cli import main
from pipeline.integrity import Fingerprint, content_mismatch, keys_digest, listing_mismatch
from pipeline.plan import _broken_commits
from pipeline.verify import audit, render

MARKER = {"rows": 2, "bytes": 100, "sha256": "ab" * 32, "etag": "etag-1", "keys_sha256": keys_digest(["k0", "k1"])}


def test_listing_check_names_a_missing_resized_or_replaced_file() -> None:
    assert listing_mismatch(MARKER, {"size": 100, "ETag": '"etag-1"'}) is None
    assert listing_mismatch(MARKER, None) == "its data file is missing"
    assert listing_mismatch(MARKER, {"size": 99, "ETag": '"etag-1"'}) == (
        "its data file is 99 bytes, the marker recorded 100"
    )
    assert "replaced after the commit (ETag etag-2" in listing_mismatch(MARKER, {"size": 100, "ETag": '"etag-2"'})
    # Local files have no entity tag: size alone is compared.
    assert listing_mismatch(MARKER, {"size": 100}) is None


def test_markers_written_before_the_integrity_fields_are_checked_for_what_they_have() -> None:
    old = {"rows": 2, "shard": "s3://b/shard.tar"}
    assert not integrity.is_fully_checkable(old)
    assert integrity.is_fully_checkable(MARKER)
    assert listing_mismatch(old, {"size": 1}) is None
    assert listing_mismatch(old, None) == "its data file is missing"
    assert content_mismatch(old, Fingerprint.of(b"x"), 2, ["k0", "k1"]) == []
    assert content_mismatch(old, Fingerprint.of(b"x"), 3, ["k0", "k1", "k2"]) == [
        "the file has 3 rows, the marker recorded 2"
    ]


def test_content_check_compares_bytes_rows_and_key_set() -> None:
    data = b"parquet bytes"
    marker = integrity.marker_fields(Fingerprint.of(data), "e", ["k1", "k0"]) | {"rows": 2}
    assert content_mismatch(marker, Fingerprint.of(data), 2, ["k0", "k1"]) == []
    same_size = b"parquet bytez"
    assert content_mismatch(marker, Fingerprint.of(same_size), 2, ["k0", "k1"]) == [
        f"the file's SHA-256 is {Fingerprint.of(same_size).sha256[:12]}…, the marker recorded "
        f"{Fingerprint.of(data).sha256[:12]}…"
    ]
    assert content_mismatch(marker, Fingerprint.of(data), 2, ["k0", "k9"]) == [
        "the file's keys are not the key set the marker recorded"
    ]


def test_keys_digest_is_order_free_and_unambiguous() -> None:
    assert keys_digest(["b", "a"]) == keys_digest(["a", "b"])
    assert keys_digest(["a,b"]) != keys_digest(["a", "b"])


def commit_shards(tmp_path: Path, names: list[str], samples: int = 3, compression: str = "zstd"):
    shards = [make_shard(tmp_path, name) for name in names]
    writer = committer(tmp_path, shards)
    writer.compression = None if compression == "none" else compression
    for shard in shards:
        writer.add(batch(*(sample(shard, i) for i in range(samples)), shard_end(shard, samples)))
    return layout(tmp_path), tmp_path / "out"


def kinds(report) -> list[tuple[str, str]]:
    return [(f.kind, f.path) for f in report.findings]


def test_marker_records_what_the_committed_file_is(tmp_path: Path) -> None:
    out, root = commit_shards(tmp_path, ["shard-00000"])
    marker = json.loads((root / "_done/shard-00000.json").read_text())
    data = (root / "shard-00000.parquet").read_bytes()
    assert (marker["bytes"], marker["sha256"]) == (len(data), Fingerprint.of(data).sha256)
    assert marker["keys_sha256"] == keys_digest(f"shard-00000-{i:03d}" for i in range(3))
    assert marker["etag"] is None  # a local file has no entity tag


def test_audit_of_a_committed_prefix_is_clean(tmp_path: Path) -> None:
    out, _ = commit_shards(tmp_path, ["shard-00000", "a/shard-00001"])
    report = audit(out)
    assert report.ok, report.findings
    assert (report.markers, report.files, report.rows, report.schemas) == (
        2,
        2,
        6,
        [f"{SCHEMA.name} v{SCHEMA.version}"],
    )
    assert render(report).splitlines()[0] == f"verify {out.url}: ok"


def test_audit_finds_a_same_size_rewrite_by_its_checksum(tmp_path: Path) -> None:
    out, root = commit_shards(tmp_path, ["shard-00000"], compression="none")
    path = root / "shard-00000.parquet"
    original = path.read_bytes()
    tampered = original.replace(b"caption 1", b"caption X")
    assert tampered != original and len(tampered) == len(original)
    path.write_bytes(tampered)
    report = audit(out)
    [finding] = report.findings
    assert (finding.kind, finding.path) == ("changed", "shard-00000.parquet")
    assert finding.detail.startswith("the file's SHA-256 is")
    # A resume, which reads no data file, sees the same size and (locally) no entity tag: only `verify` reads it.
    assert _broken_commits(out, out.objects(), ["shard-00000"]) == {}


def test_audit_finds_duplicates_orphans_staged_files_and_missing_files(tmp_path: Path) -> None:
    out, root = commit_shards(tmp_path, ["shard-00000", "shard-00001"])
    (root / "copy.parquet").write_bytes((root / "shard-00000.parquet").read_bytes())
    (root / "_staging/run-0").mkdir(parents=True)
    (root / "_staging/run-0/shard-00001.parquet").write_bytes(b"half")
    (root / "shard-00001.parquet").unlink()
    report = audit(out)
    assert kinds(report) == [
        ("missing", "shard-00001.parquet"),
        ("duplicate", "shard-00000.parquet"),
        ("orphan", "copy.parquet"),
        ("staged", "_staging/run-0/shard-00001.parquet"),
    ]
    assert "3 sample(s) also in copy.parquet" in report.findings[1].detail
    assert render(report).splitlines()[0] == f"verify {out.url}: 4 problem(s)"
    assert _broken_commits(out, out.objects(), ["shard-00000", "shard-00001"]) == {
        "shard-00001": "its data file is missing"
    }


def test_audit_checks_each_file_against_the_schema_version_it_declares(tmp_path: Path) -> None:
    out, root = commit_shards(tmp_path, ["shard-00000"])
    table = pq.read_table(root / "shard-00000.parquet")
    metadata = dict(table.schema.metadata)
    pq.write_table(
        table.replace_schema_metadata({**metadata, b"llava_pipeline.schema_version": b"99"}), root / "v99.parquet"
    )
    pq.write_table(table.replace_schema_metadata({}), root / "unversioned.parquet")
    retyped = table.set_column(
        table.column_names.index("image_width"), "image_width", table["image_width"].cast(pa.string())
    )
    pq.write_table(retyped.replace_schema_metadata(metadata), root / "retyped.parquet")
    nulled = table.set_column(
        table.column_names.index("key"), pa.field("key", pa.string(), nullable=True), pa.array([None] * 3, pa.string())
    )
    pq.write_table(nulled.replace_schema_metadata(metadata), root / "nulled.parquet")
    schema_findings = {f.path: f.detail for f in audit(out).findings if f.kind == "schema"}
    assert "declares schema version 99, which this llava-pipeline does not know" in schema_findings["v99.parquet"]
    assert schema_findings["unversioned.parquet"].startswith("declares no schema version")
    assert schema_findings["retyped.parquet"] == (
        f"column 'image_width' is string, {SCHEMA.name} v{SCHEMA.version} says {SCHEMA.arrow.field('image_width').type}"
    )
    assert "column 'key' is nullable" in schema_findings["nulled.parquet"]


def test_audit_notes_markers_older_than_the_checksums_and_still_checks_their_rows(tmp_path: Path) -> None:
    out, root = commit_shards(tmp_path, ["shard-00000", "shard-00001"])
    for name, rows in (("shard-00000", 3), ("shard-00001", 4)):
        marker_path = root / f"_done/{name}.json"
        marker = json.loads(marker_path.read_text())
        marker_path.write_text(json.dumps({k: v for k, v in marker.items() if k in ("shard", "rows")} | {"rows": rows}))
    report = audit(out)
    assert report.partly_checked == ["shard-00000", "shard-00001"]
    assert kinds(report) == [("changed", "shard-00001.parquet")]
    assert report.findings[0].detail == "the file has 3 rows, the marker recorded 4"
    assert "2 marker(s) predate recorded sizes and checksums" in render(report)
    # Resume reads such a file's footer for its row count.
    assert _broken_commits(out, out.objects(), ["shard-00000", "shard-00001"]) == {
        "shard-00001": "its data file has 3 rows, the marker recorded 4"
    }


def test_audit_of_an_empty_prefix_is_a_finding(tmp_path: Path) -> None:
    assert kinds(audit(layout(tmp_path))) == [("empty", "")]


@pytest.mark.parametrize("size_change", [b"", b"extra"])
def test_resume_repairs_a_file_whose_size_differs(tmp_path: Path, size_change: bytes) -> None:
    out, root = commit_shards(tmp_path, ["shard-00000"])
    path = root / "shard-00000.parquet"
    data = path.read_bytes()
    path.write_bytes(data[:-10] if not size_change else data + size_change)
    [(name, reason)] = _broken_commits(out, out.objects(), ["shard-00000"]).items()
    assert name == "shard-00000" and reason.startswith("its data file is ") and "the marker recorded" in reason


def test_verify_command_takes_the_prefix_and_storage_from_a_job(tmp_path: Path, capsys) -> None:
    out, _ = commit_shards(tmp_path, ["shard-00000"])
    job = tmp_path / "job.yaml"
    job.write_text(
        json.dumps(
            {
                "name": "nightly",
                "input": {"urls": [str(tmp_path / "in/*.tar")]},
                "output": {"url": out.url},
                "model": {"source": "org/model"},
                "tasks": {"caption": {}},
            }
        )
    )
    assert main(["verify", "--job", str(job)]) == 0
    assert capsys.readouterr().out.startswith(f"verify {out.url}: ok")
    assert main(["verify", "--json", out.url]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert main(["verify"]) == 2
    assert "give OUTPUT_URL, or --job" in capsys.readouterr().err
    assert main(["verify", out.url, "--endpoint-url", "minio:9000"]) == 2
    assert "--endpoint-url: " in capsys.readouterr().err
