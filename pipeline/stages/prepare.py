"""Prepare stage (CPU actors): decode each image once and build every model input it needs.

Decoding and preprocessing share one stage so decoded pixels never cross the object store; what
leaves is the image processor's arrays plus the token ids of each task's prompt, which is all
the model stage needs to pad, stack and generate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pyarrow as pa

from pipeline import rows
from pipeline.config import ModelConfig, TasksConfig
from pipeline.images import ImageDecodeError, decode_image
from pipeline.model_source import ModelSource, local_model_dir
from pipeline.modeling import InputBuilder, load_processor, pack_arrays
from pipeline.prompts import MetadataError, prompts_for, sample_questions

_OUTPUT_FIELDS = [
    pa.field("image_format", pa.string()),
    pa.field("image_width", pa.int32()),
    pa.field("image_height", pa.int32()),
    pa.field(rows.MODEL_INPUTS, pa.binary()),
    pa.field(rows.PROMPT_IDS, pa.list_(pa.list_(pa.int32()))),
    pa.field(rows.PROMPT_TASKS, pa.list_(pa.string())),
    pa.field(rows.QUESTIONS, pa.list_(pa.string())),
    pa.field("error", pa.string()),
    pa.field("error_reason", pa.string()),
]


@dataclass(frozen=True)
class PrepareSpec:
    model: ModelSource
    model_config: ModelConfig
    tasks: TasksConfig
    max_image_pixels: int


class PrepareStage:
    def __init__(self, spec: PrepareSpec):
        self.spec = spec
        processor = load_processor(local_model_dir(spec.model, files="processor"), spec.model_config)
        self.builder = InputBuilder(processor)
        vqa = spec.tasks.vqa
        self.job_questions = list(vqa.questions) if vqa else []
        self.sample_field = vqa.sample_field if vqa else None
        self.max_sample_questions = vqa.max_questions_per_sample if vqa else 0

    def __call__(self, table: pa.Table) -> pa.Table:
        started = time.perf_counter()
        pending = rows.pending_mask(table).to_pylist()
        images = table.column(rows.IMAGE_BYTES)
        metadata = table.column("metadata")
        out: dict[str, list[object]] = {f.name: [] for f in _OUTPUT_FIELDS}
        errors = table.column("error").to_pylist()
        reasons = table.column("error_reason").to_pylist()

        for i in range(table.num_rows):
            result = self._prepare(images[i].as_py(), metadata[i].as_py()) if pending[i] else {}
            for name, column in out.items():
                column.append(result.get(name))
            if not pending[i]:
                out["error"][-1] = errors[i]
                out["error_reason"][-1] = reasons[i]

        table = table.drop_columns([rows.IMAGE_BYTES])
        for field in _OUTPUT_FIELDS:
            table = rows.set_column(table, field.name, pa.array(out[field.name], field.type))
        return rows.add_seconds(table, "prepare", time.perf_counter() - started)

    def _prepare(self, image_bytes: bytes, metadata: str | None) -> dict[str, object]:
        try:
            decoded = decode_image(image_bytes, max_pixels=self.spec.max_image_pixels)
        except ImageDecodeError as exc:
            return {"error": str(exc), "error_reason": exc.reason}
        result: dict[str, object] = {
            "image_format": decoded.format,
            "image_width": decoded.width,
            "image_height": decoded.height,
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

        prompts = prompts_for(self.spec.tasks, questions)
        try:
            token_ids: list[list[int]] = []
            if prompts:
                arrays, replacement = self.builder.image_arrays(decoded.image)
                token_ids = self.builder.token_ids([self.builder.render(p.instruction) for p in prompts], replacement)
                result[rows.MODEL_INPUTS] = pack_arrays(arrays)
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
