"""Model stage (GPU actors): every task for every image of a batch, in one actor call.

Prompts are grouped by task (each task has its own token limit), sorted by length so a padded
batch wastes little, and generated in chunks of at most `batch_size` sequences. A chunk that
raises is split in halves until the failing sample is alone; that sample becomes an error row
and its neighbours keep their answers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa

from pipeline import rows
from pipeline.config import GenerationConfig, ModelConfig, TasksConfig
from pipeline.model_source import ModelSource, local_model_dir
from pipeline.modeling import Generator, PromptInput, load_processor, unpack_arrays
from pipeline.prompts import CAPTION, TAGS, VQA, parse_tags

log = logging.getLogger(__name__)

_VQA_TYPE = pa.list_(
    pa.struct([pa.field("question", pa.string(), nullable=False), pa.field("answer", pa.string(), nullable=False)])
)
_DROPPED = [rows.MODEL_INPUTS, rows.PROMPT_IDS, rows.PROMPT_TASKS, rows.QUESTIONS]


@dataclass(frozen=True)
class GenerateSpec:
    model: ModelSource
    model_config: ModelConfig
    generation: GenerationConfig
    tasks: TasksConfig
    vocabulary: frozenset[str] | None
    batch_size: int


@dataclass
class _Work:
    row: int
    slot: int
    item: PromptInput


class GenerateStage:
    def __init__(self, spec: GenerateSpec):
        self.spec = spec
        model_dir = local_model_dir(spec.model, files="all")
        processor = load_processor(model_dir, spec.model_config)
        self.generator = Generator(model_dir, spec.model_config, spec.generation, processor)
        self.max_new_tokens = {
            CAPTION: spec.tasks.caption.max_new_tokens if spec.tasks.caption else 0,
            TAGS: spec.tasks.tags.max_new_tokens if spec.tasks.tags else 0,
            VQA: spec.tasks.vqa.max_new_tokens if spec.tasks.vqa else 0,
        }

    def __call__(self, table: pa.Table) -> pa.Table:
        started = time.perf_counter()
        tasks = table.column(rows.PROMPT_TASKS).to_pylist()
        token_ids = table.column(rows.PROMPT_IDS).to_pylist()
        inputs = table.column(rows.MODEL_INPUTS)

        work: dict[str, list[_Work]] = {CAPTION: [], TAGS: [], VQA: []}
        for row, row_tasks in enumerate(tasks):
            if not row_tasks:
                continue
            image = unpack_arrays(inputs[row].as_py())
            for slot, task in enumerate(row_tasks):
                work[task].append(_Work(row, slot, PromptInput(token_ids[row][slot], image)))

        answers: dict[tuple[int, int], str | BaseException] = {}
        for task, items in work.items():
            items.sort(key=lambda w: len(w.item.token_ids))
            for start in range(0, len(items), self.spec.batch_size):
                chunk = items[start : start + self.spec.batch_size]
                for w, answer in zip(
                    chunk, self._generate_isolating([w.item for w in chunk], self.max_new_tokens[task])
                ):
                    answers[(w.row, w.slot)] = answer

        table = self._with_results(table, tasks, answers)
        table = table.drop_columns([c for c in _DROPPED if c in table.column_names])
        return rows.add_seconds(table, "model", time.perf_counter() - started)

    def _generate_isolating(self, items: list[PromptInput], max_new_tokens: int) -> list[str | BaseException]:
        try:
            return list(self.generator.generate(items, max_new_tokens))
        except Exception as exc:
            if len(items) == 1:
                log.warning("generation failed for one sample: %s: %s", type(exc).__name__, exc)
                return [exc]
            self.generator.release_memory()
            half = len(items) // 2
            return self._generate_isolating(items[:half], max_new_tokens) + self._generate_isolating(
                items[half:], max_new_tokens
            )

    def _with_results(
        self, table: pa.Table, tasks: list[list[str] | None], answers: dict[tuple[int, int], str | BaseException]
    ) -> pa.Table:
        questions = table.column(rows.QUESTIONS).to_pylist()
        errors = table.column("error").to_pylist()
        reasons = table.column("error_reason").to_pylist()
        captions: list[str | None] = []
        tags: list[list[str] | None] = []
        vqa: list[list[dict[str, str]] | None] = []
        tags_config = self.spec.tasks.tags

        for row, row_tasks in enumerate(tasks):
            caption = row_tags = row_vqa = None
            if row_tasks is not None:
                failures = [a for slot in range(len(row_tasks)) if isinstance(a := answers[(row, slot)], BaseException)]
                if failures:
                    message = f"generation failed: {type(failures[0]).__name__}: {failures[0]}"
                    errors[row] = f"{errors[row]}; {message}" if errors[row] else message
                    reasons[row] = "generation_failed"  # the reason that explains the missing outputs
                else:
                    texts = [answers[(row, slot)] for slot in range(len(row_tasks))]
                    by_task = list(zip(row_tasks, texts))
                    if self.spec.tasks.caption is not None:
                        caption = next(t for task, t in by_task if task == CAPTION)
                    if tags_config is not None:
                        raw = next(t for task, t in by_task if task == TAGS)
                        row_tags = parse_tags(raw, max_tags=tags_config.max_tags, vocabulary=self.spec.vocabulary)
                    if self.spec.tasks.vqa is not None:
                        answered = [t for task, t in by_task if task == VQA]
                        row_vqa = [{"question": q, "answer": a} for q, a in zip(questions[row], answered)]
            captions.append(caption)
            tags.append(row_tags)
            vqa.append(row_vqa)

        now = datetime.now(timezone.utc)
        columns = {
            "caption": pa.array(captions, pa.string()),
            "tags": pa.array(tags, pa.list_(pa.string())),
            "vqa": pa.array(vqa, _VQA_TYPE),
            "error": pa.array(errors, pa.string()),
            "error_reason": pa.array(reasons, pa.string()),
            "processed_at": pa.array([now] * table.num_rows, pa.timestamp("us", tz="UTC")),
        }
        for name, values in columns.items():
            table = rows.set_column(table, name, values)
        return table
