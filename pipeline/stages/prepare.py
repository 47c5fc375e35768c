"""Prepare stage (CPU actors): decode each image once and build every model input it needs.

Decoding and preprocessing share one stage so decoded pixels never cross the object store; what
leaves is the image processor's arrays plus the token ids of each task's prompt, which is all
the model stage needs to pad, stack and generate. With `embed.image_text_model`, the same decoded
image also gives the embedding model's pixels (`rows.CLIP_PIXELS`, for the embed stage): the image
is decoded once, at a size that serves both processors.
"""

from __future__ import annotations

import pyarrow as pa

from pipeline import rows
from pipeline.config import DecodeConfig, ModelConfig, TasksConfig
from pipeline.images import ImageDecodeError, decode_image
from pipeline.inputs import (
    InputBuilder,
    PixelBuilder,
    largest_decode_size,
    load_image_processor,
    load_processor,
    pack_arrays,
)
from pipeline.model_source import ModelSource, local_model_dir
from pipeline.prompts import MetadataError, prompts_for, sample_questions
from pipeline.stages.base import Columns, MapStage, RowStage
from pipeline.stages.embed import EmbedSources


class PrepareStage(RowStage):
    name = "prepare"
    output_fields = (
        pa.field("image_format", pa.string()),
        pa.field("image_width", pa.int32()),
        pa.field("image_height", pa.int32()),
        pa.field(rows.MODEL_INPUTS, pa.binary()),
        pa.field(rows.PROMPT_IDS, pa.list_(pa.list_(pa.int32()))),
        pa.field(rows.PROMPT_TASKS, pa.list_(pa.string())),
        pa.field(rows.QUESTIONS, pa.list_(pa.string())),
    )
    consumes = (rows.IMAGE_BYTES,)

    def __init__(
        self,
        model: ModelSource,
        model_config: ModelConfig,
        tasks: TasksConfig,
        decode: DecodeConfig,
        embed: EmbedSources | None = None,
    ):
        self.tasks = tasks
        self.decode = decode
        self.builder = InputBuilder(load_processor(local_model_dir(model, files="processor"), model_config))
        self.clip_pixels: PixelBuilder | None = None
        if embed is not None and embed.image_text is not None:
            directory = local_model_dir(embed.image_text, files="processor")
            self.clip_pixels = PixelBuilder(load_image_processor(directory, embed.image_text.field))
            self.output_fields = (*type(self).output_fields, pa.field(rows.CLIP_PIXELS, pa.binary()))
        self.decode_size = self._decode_size if decode.reduced_scale else None
        vqa = tasks.vqa
        self.job_questions = list(vqa.questions) if vqa else []
        self.sample_field = vqa.sample_field if vqa else None
        self.max_sample_questions = vqa.max_questions_per_sample if vqa else 0

    def _decode_size(self, width: int, height: int) -> tuple[int, int] | None:
        """The smallest size the image may be decoded at for the model and, where it has one, the embedding model."""
        sizes = [self.builder.decode_size(width, height)]
        if self.clip_pixels is not None:
            sizes.append(self.clip_pixels.decode_size(width, height))
        return largest_decode_size(*sizes)

    def process(self, work: pa.Table) -> Columns:
        names = [f.name for f in self.output_fields] + ["error", "error_reason"]
        out: Columns = {name: [] for name in names}
        images = work.column(rows.IMAGE_BYTES)
        metadata = work.column("metadata")
        for i in range(work.num_rows):
            result = self._prepare(images[i].as_py(), metadata[i].as_py())
            for name, column in out.items():
                column.append(result.get(name))
        return out

    def _prepare(self, image_bytes: bytes, metadata: str | None) -> dict[str, object]:
        try:
            decoded = decode_image(image_bytes, max_pixels=self.decode.max_image_pixels, decode_size=self.decode_size)
        except ImageDecodeError as exc:
            return {"error": str(exc), "error_reason": exc.reason}
        result: dict[str, object] = {
            "image_format": decoded.format,
            "image_width": decoded.width,
            "image_height": decoded.height,
        }
        if self.clip_pixels is not None:
            try:
                result[rows.CLIP_PIXELS] = self.clip_pixels.build(decoded.image)
            except Exception as exc:  # the embedding model's processor rejected the image: no embedding, no answers
                return {
                    **result,
                    "error": f"preprocessing for embed.image_text_model failed: {type(exc).__name__}: {exc}",
                    "error_reason": "preprocess_failed",
                }

        questions = list(self.job_questions)
        try:
            own = sample_questions(metadata, self.sample_field)
        except MetadataError as exc:
            own = []
            result.update(error=str(exc), error_reason="bad_metadata")
        if len(own) > self.max_sample_questions:
            result.update(
                error=f"the sample asks {len(own)} questions; answered the first {self.max_sample_questions}",
                error_reason="too_many_questions",
            )
            own = own[: self.max_sample_questions]
        questions += own

        prompts = prompts_for(self.tasks, questions)
        try:
            token_ids: list[list[int]] = []
            if prompts:
                inputs = self.builder.build(decoded.image, [p.instruction for p in prompts])
                token_ids = inputs.token_ids
                result[rows.MODEL_INPUTS] = pack_arrays(inputs.arrays)
        except Exception as exc:  # the processor's errors are as varied as the checkpoints that ship it
            return {
                **result,
                "error": f"preprocessing failed: {type(exc).__name__}: {exc}",
                "error_reason": "preprocess_failed",
            }
        result[rows.PROMPT_IDS] = token_ids
        result[rows.PROMPT_TASKS] = [p.task for p in prompts]
        result[rows.QUESTIONS] = questions
        return result


PREPARE = MapStage(
    fn=PrepareStage,
    section=lambda job: job.stages.prepare,
    constructor_kwargs=lambda plan: {
        "model": plan.model,
        "model_config": plan.job.model,
        "tasks": plan.job.tasks,
        "decode": plan.job.decode,
        "embed": EmbedSources.of(plan.job),
    },
    in_next_stage=lambda job: job.stages.prepare.in_model_actors,
)
