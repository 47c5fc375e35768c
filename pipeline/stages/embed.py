"""Embed stage (actors, only with an `embed` section): image embeddings, `clip_score` and caption embeddings.

It runs after the parse stage, since two of its columns embed the caption:

- `image_embedding`: `embed.image_text_model`'s image tower over the pixels the prepare stage made from
  the image it decoded for the model (`rows.CLIP_PIXELS`), so no image is decoded twice;
- `clip_score`: the cosine of that image embedding and the same model's text embedding of the caption;
- `caption_embedding`: `embed.text_model` (sentence-transformers) over the caption.

Every row whose image decoded is embedded, a row whose generation failed included (its caption
columns stay null); a row with neither pixels nor a caption passes through. Each model runs over the
batch at once; a call that raises is split in halves until the failing row is alone, which then gets
the error (`embed_failed`) while its neighbours keep their embeddings, as in the model stage.
Checkpoints are fetched once per node (`pipeline.model_source`) and loaded once per actor.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import rows
from pipeline.config import EmbedConfig, EmbedModelConfig, JobConfig
from pipeline.inputs import load_image_processor, unpack_arrays
from pipeline.model_source import ModelSource, local_model_dir
from pipeline.stages.base import Columns, MapStage, RowStage, isolate_failures
from pipeline.storage import resolve_storage

if TYPE_CHECKING:
    from pipeline.plan import Plan

IMAGE_EMBEDDING = "image_embedding"
CLIP_SCORE = "clip_score"
CAPTION_EMBEDDING = "caption_embedding"
VECTOR_TYPE = pa.list_(pa.float32())
_FIELDS = {
    IMAGE_EMBEDDING: pa.field(IMAGE_EMBEDDING, VECTOR_TYPE),
    CLIP_SCORE: pa.field(CLIP_SCORE, pa.float32()),
    CAPTION_EMBEDDING: pa.field(CAPTION_EMBEDDING, VECTOR_TYPE),
}


def embedding_columns(job: JobConfig) -> dict[str, str]:
    """The embedding columns this job writes, in schema order, each with the model that makes it (as the job
    names it): what the writer records in each file's `llava_pipeline.embeddings`."""
    embed = job.embed
    if embed is None:
        return {}
    columns: dict[str, str] = {}
    if embed.image_text_model is not None:
        columns[IMAGE_EMBEDDING] = embed.image_text_model.source
        if job.tasks.caption is not None:
            columns[CLIP_SCORE] = embed.image_text_model.source
    if embed.text_model is not None:
        columns[CAPTION_EMBEDDING] = embed.text_model.source
    return columns


@dataclass(frozen=True)
class EmbedSources:
    """Where the job's embedding checkpoints live (picklable: shipped to the prepare and embed actors)."""

    image_text: ModelSource | None
    text: ModelSource | None

    @classmethod
    def of(cls, job: JobConfig) -> "EmbedSources | None":
        if job.embed is None:
            return None

        def source(name: str) -> ModelSource | None:
            config: EmbedModelConfig | None = getattr(job.embed, name)
            if config is None:
                return None
            storage = resolve_storage(config.storage or job.storage)
            return ModelSource.from_config(config, storage, field=f"embed.{name}.source")

        return cls(image_text=source("image_text_model"), text=source("text_model"))


def check_embed_models(job: JobConfig) -> Callable[[], object] | None:
    """Before a run: each embedding checkpoint is there (a ConfigError naming the field if not); what it returns
    (picklable, for the plan's checks process) checks that the image-text model's processor files load
    (transformers). Only processor files are fetched here; weights load in the actors. None: nothing to load."""
    sources = EmbedSources.of(job)
    if sources is None:
        return None
    load = None
    if sources.image_text is not None:
        image_dir = local_model_dir(sources.image_text, files="processor")
        load = functools.partial(load_image_processor, image_dir, sources.image_text.field)
    if sources.text is not None:
        local_model_dir(sources.text, files="processor")
    return load


def _device_and_dtype(config: EmbedModelConfig, field: str) -> tuple[str, str]:
    from pipeline.generator import resolve_device

    device = resolve_device(config, field=field, stage="embed").type
    dtype = config.dtype if config.dtype != "auto" else ("float16" if device == "cuda" else "float32")
    return device, dtype


class EmbedStage(RowStage):
    name = "embed"
    consumes = (rows.CLIP_PIXELS,)

    def __init__(self, sources: EmbedSources, embed: EmbedConfig, columns: Sequence[str]):
        from pipeline.embedders import ImageTextEmbedder, TextEmbedder

        # Only the job's columns: a job writes the embedding columns it configures and no others.
        self.output_fields = tuple(_FIELDS[name] for name in columns)
        self.columns = frozenset(columns)
        self.image_text = self.text = None
        self.pixel_scaling = None
        if sources.image_text is not None and embed.image_text_model is not None:
            from pipeline.inputs import PixelScaling

            device, dtype = _device_and_dtype(embed.image_text_model, "embed.image_text_model")
            directory = local_model_dir(sources.image_text, files="all")
            self.image_text = ImageTextEmbedder(directory, device=device, dtype=dtype)
            self.pixel_scaling = PixelScaling.of(self.image_text.image_processor)
        if sources.text is not None and embed.text_model is not None:
            device, dtype = _device_and_dtype(embed.text_model, "embed.text_model")
            self.text = TextEmbedder(local_model_dir(sources.text, files="all"), device=device)
            if dtype != "float32":
                import torch

                self.text.model.to(getattr(torch, dtype))

    def select(self, table: pa.Table) -> pa.ChunkedArray:
        """Sample rows with an image prepared for the image tower or a caption to embed."""
        wanted = pc.is_valid(table.column(rows.CLIP_PIXELS)) if rows.CLIP_PIXELS in table.column_names else None
        if "caption" in table.column_names and self.columns & {CLIP_SCORE, CAPTION_EMBEDDING}:
            captioned = pc.is_valid(table.column("caption"))
            wanted = captioned if wanted is None else pc.or_(wanted, captioned)
        if wanted is None:
            return pa.chunked_array([pa.array([False] * table.num_rows)])
        return pc.and_(pc.equal(table.column(rows.RECORD), rows.SAMPLE), wanted)

    def process(self, work: pa.Table) -> Columns:
        count = work.num_rows
        pixels = work.column(rows.CLIP_PIXELS).to_pylist() if rows.CLIP_PIXELS in work.column_names else [None] * count
        captions = work.column("caption").to_pylist() if "caption" in work.column_names else [None] * count
        failures: list[list[str]] = [[] for _ in range(count)]

        image_vectors: list[np.ndarray | None] = [None] * count
        clip_texts: list[np.ndarray | None] = [None] * count
        caption_vectors: list[np.ndarray | None] = [None] * count
        if self.image_text is not None:
            with_pixels = {i: p for i, p in enumerate(pixels) if p is not None}
            self._embed("image", self._image_vectors, with_pixels, image_vectors, failures)
            if CLIP_SCORE in self.columns:
                # A caption is scored against its own image: only rows that have both.
                scored = {i: c for i, c in enumerate(captions) if c is not None and image_vectors[i] is not None}
                self._embed("caption (image-text model)", self.image_text.embed_texts, scored, clip_texts, failures)
        if self.text is not None:
            captioned = {i: c for i, c in enumerate(captions) if c is not None}
            self._embed("caption (text model)", self.text.embed, captioned, caption_vectors, failures)

        out: Columns = {}
        if IMAGE_EMBEDDING in self.columns:
            out[IMAGE_EMBEDDING] = [_vector(v) for v in image_vectors]
        if CLIP_SCORE in self.columns:
            out[CLIP_SCORE] = [
                None if image is None or text is None else float(np.dot(image, text))
                for image, text in zip(image_vectors, clip_texts)
            ]
        if CAPTION_EMBEDDING in self.columns:
            out[CAPTION_EMBEDDING] = [_vector(v) for v in caption_vectors]
        out["error"] = [f"embedding failed: {'; '.join(f)}" if f else None for f in failures]
        out["error_reason"] = ["embed_failed" if f else None for f in failures]
        return out

    def _image_vectors(self, packed: list[bytes]) -> np.ndarray:
        import torch

        from pipeline.generator import scale_pixels

        arrays = np.stack([unpack_arrays(data)["pixel_values"] for data in packed])
        if arrays.dtype == np.uint8:  # resized pixels: the processor's rescale and normalisation, done here
            values = scale_pixels(torch.from_numpy(arrays), self.pixel_scaling).numpy()
        else:  # the processor's own values, shipped as float16
            values = arrays.astype(np.float32)
        return self.image_text.embed_pixels(values)

    @staticmethod
    def _embed(
        what: str,
        embed: Callable[[list], np.ndarray],
        inputs: dict[int, object],
        into: list[np.ndarray | None],
        failures: list[list[str]],
    ) -> None:
        """`embed` over every row's input at once (`inputs`: row -> input); a failure isolates its row by
        halving, and that row records what failed."""
        results = isolate_failures(_checked(embed), list(inputs.values()), fault_point="embed.batch", what="embedding")
        for position, result in zip(inputs, results):
            if isinstance(result, BaseException):
                failures[position].append(f"{what}: {type(result).__name__}: {result}")
            else:
                into[position] = result


def _checked(embed: Callable[[list], np.ndarray]) -> Callable[[list], np.ndarray]:
    """`embed`, failing when the model returns too few vectors or non-finite ones."""

    def call(inputs: list) -> np.ndarray:
        vectors = embed(inputs)
        if len(vectors) != len(inputs) or not np.isfinite(vectors).all():
            raise ValueError(f"the model returned {len(vectors)} vectors for {len(inputs)} inputs, or non-finite ones")
        return vectors

    return call


def _vector(vector: np.ndarray | None) -> list[float] | None:
    return None if vector is None else vector.astype(np.float32).tolist()


def _constructor_kwargs(plan: "Plan") -> dict[str, object]:
    job = plan.job
    assert job.embed is not None  # the stage is enabled only with an embed section
    return {"sources": EmbedSources.of(job), "embed": job.embed, "columns": list(embedding_columns(job))}


EMBED = MapStage(
    fn=EmbedStage,
    section=lambda job: job.stages.embed,
    constructor_kwargs=_constructor_kwargs,
    enabled=lambda job: job.embed is not None,
)
