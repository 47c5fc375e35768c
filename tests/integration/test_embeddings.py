"""A job with `embed`: shards and a CLIP checkpoint in the local S3 server, the real all-MiniLM-L6-v2 from its
package -> `llava-pipeline run` -> version-3 Parquet with embeddings, read back and checked against the models."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from support import base_job, read_output, run_cli, upload

from pipeline.cli import main
from pipeline.embedders import ImageTextEmbedder, TextEmbedder, packaged_text_model
from pipeline.images import decode_image
from pipeline.testing.shards import synthetic_samples, write_shard
from pipeline.testing.tiny_clip import build_tiny_clip

BUCKET = "embeddings"


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip", seed=3)


@pytest.fixture(scope="module")
def embed_run(s3, ray_address, tiny_model, clip_dir, tmp_path_factory):
    """One run of a captioning job with both embedding models: 4 good images and one that is not an image."""
    s3.create_bucket(BUCKET)
    fs = s3.filesystem()
    samples = synthetic_samples(4, seed=11, key_prefix="e", extensions=("jpg", "png"), sizes=((64, 48), (40, 72)))
    samples.append({"__key__": "e-bad", "jpg": b"these bytes are not an image", "json": b"{}"})
    buffer = io.BytesIO()
    write_shard(buffer, samples)
    fs.pipe(f"{BUCKET}/shards/shard-00000.tar", buffer.getvalue())
    upload(s3, clip_dir, f"{BUCKET}/models/tiny-clip")  # fetched once per node, as the LLaVA checkpoint is

    clip_url = f"s3://{BUCKET}/models/tiny-clip"
    minilm = str(packaged_text_model())
    cache = str(tmp_path_factory.mktemp("cache"))
    job = base_job(
        BUCKET,
        tiny_model,
        embed={
            "image_text_model": {"source": clip_url, "device": "cpu", "cache_dir": cache},
            "text_model": {"source": minilm, "device": "cpu"},
        },
        failures={"max_failed_sample_fraction": 0.5},
    )
    job["stages"]["embed"] = {"concurrency": 1, "num_cpus": 0.5, "batch_size": 8}
    job_path = tmp_path_factory.mktemp("jobs") / "job.yaml"
    job_path.write_text(yaml.safe_dump(job))
    exit_code = main(["run", str(job_path)])
    with fs.open(f"{BUCKET}/out/shard-00000.parquet", "rb") as handle:
        schema = pq.read_schema(handle)
    return {
        "exit_code": exit_code,
        "table": read_output(s3, f"s3://{BUCKET}/out/"),
        "schema": schema,
        "summary": json.loads(fs.cat_file(fs.glob(f"{BUCKET}/out/_runs/*.json")[0])),
        "images": {s["__key__"]: s.get("jpg") or s.get("png") for s in samples},
        "clip_url": clip_url,
        "minilm": minilm,
        "job_path": job_path,
    }


def rows_by_key(run) -> dict[str, dict]:
    return {row["key"]: row for row in run["table"].to_pylist()}


def test_every_good_row_has_normalised_embeddings_of_the_models_dimensions(embed_run):
    assert embed_run["exit_code"] == 0
    rows = rows_by_key(embed_run)
    assert len(rows) == 5
    good = [row for key, row in rows.items() if key != "e-bad"]
    for row in good:
        assert row["error"] is None and isinstance(row["caption"], str)
        image, caption = np.array(row["image_embedding"]), np.array(row["caption_embedding"])
        assert image.shape == (32,) and caption.shape == (384,)
        assert np.linalg.norm(image) == pytest.approx(1, abs=1e-5)
        assert np.linalg.norm(caption) == pytest.approx(1, abs=1e-5)
        assert -1 <= row["clip_score"] <= 1


def test_embeddings_are_the_models_own_for_the_image_and_its_caption(embed_run, clip_dir):
    """clip_score is the cosine of the row's image embedding and CLIP's text embedding of its caption; the image
    embedding is CLIP's for the sample's image; the caption embedding is MiniLM's for the caption."""
    clip, minilm = ImageTextEmbedder(clip_dir), TextEmbedder(embed_run["minilm"])
    for key, row in rows_by_key(embed_run).items():
        if key == "e-bad":
            continue
        image = np.array(row["image_embedding"], np.float32)
        text = clip.embed_texts([row["caption"]])[0]
        assert row["clip_score"] == pytest.approx(float(image @ text), abs=1e-5)
        # decoded here at full size; the prepare stage may decode a JPEG smaller (draft mode) for the same 32 px
        reference = clip.embed_images([decode_image(embed_run["images"][key], max_pixels=10**8).image])[0]
        assert float(image @ reference) > 0.99
        np.testing.assert_allclose(row["caption_embedding"], minilm.embed([row["caption"]])[0], atol=1e-5)


def test_a_bad_image_is_still_a_row_with_its_error_and_no_embeddings(embed_run):
    bad = rows_by_key(embed_run)["e-bad"]
    assert bad["error_reason"] == "unrecognized_image"
    assert bad["image_embedding"] is None and bad["clip_score"] is None and bad["caption_embedding"] is None


def test_files_are_version_3_and_record_the_embedding_models_and_dimensions(embed_run):
    metadata = embed_run["schema"].metadata
    assert metadata[b"llava_pipeline.schema_version"] == b"3"
    assert json.loads(metadata[b"llava_pipeline.embeddings"]) == {
        "image_embedding": {"model": embed_run["clip_url"], "dimension": 32},
        "clip_score": {"model": embed_run["clip_url"]},
        "caption_embedding": {"model": embed_run["minilm"], "dimension": 384},
    }
    assert embed_run["schema"].names[-3:] == ["image_embedding", "clip_score", "caption_embedding"]
    assert embed_run["summary"]["embeddings"] == json.loads(metadata[b"llava_pipeline.embeddings"])
    assert embed_run["summary"]["stages"]["embed"]["busy_seconds"] > 0


def test_verify_checks_a_version_3_prefix(capsys, embed_run):
    result = run_cli(capsys, "verify", f"s3://{BUCKET}/out/")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "schema llava-pipeline/enrichment v3" in result.stdout


def test_validate_names_the_embedding_columns_and_their_models(capsys, embed_run):
    result = run_cli(capsys, "validate", str(embed_run["job_path"]))
    assert result.exit_code == 0, result.stderr
    clip, minilm = embed_run["clip_url"], embed_run["minilm"]
    assert f"  embed   image_embedding ({clip}), clip_score ({clip}), caption_embedding ({minilm})" in result.stdout


def test_a_missing_embedding_model_stops_the_job_before_any_work(capsys, s3, bucket, tiny_model, write_job, tmp_path):
    fs = s3.filesystem()
    buffer = io.BytesIO()
    write_shard(buffer, synthetic_samples(1, seed=1))
    fs.pipe(f"{bucket}/shards/shard-00000.tar", buffer.getvalue())
    job = base_job(bucket, tiny_model, embed={"image_text_model": {"source": f"s3://{bucket}/models/no-clip"}})
    result = run_cli(capsys, "run", str(write_job(job)), runner_importable=False)
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("error: embed.image_text_model.source: "), result.stderr
    assert "no-clip" in result.stderr and "Traceback" not in result.stderr
    assert not fs.find(f"{bucket}/out/")
