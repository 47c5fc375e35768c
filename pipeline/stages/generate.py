"""Model stage (GPU actors): every task for every image of a batch, in one actor call.

Images are sorted by prompt length, so a padded batch wastes little, and generated in chunks of at
most `batch_size` images, each with all of its prompts: the vision tower and the shared prefix of an
image's prompts run once per image (`Generator.generate_for_images`). A chunk that
raises (out of memory included) is split in halves until the failing sample is alone; that sample
becomes an error row and its neighbours keep their answers. A call that hangs past
`batch_timeout_s` kills its own actor, so Ray retries the batch on a fresh one.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterator

import pyarrow as pa

from pipeline import faults, rows
from pipeline.config import GenerationConfig, ModelConfig, TasksConfig
from pipeline.model_source import ModelSource, local_model_dir
from pipeline.modeling import Generator, ImagePrompts, load_processor, unpack_arrays
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
    batch_timeout_s: float | None = None


class GenerateStage:
    def __init__(self, spec: GenerateSpec):
        self.spec = spec
        faults.inject("model.load")
        model_dir = local_model_dir(spec.model, files="all")
        processor = load_processor(model_dir, spec.model_config)
        self.generator = Generator(model_dir, spec.model_config, spec.generation, processor)
        self.max_new_tokens = {
            CAPTION: spec.tasks.caption.max_new_tokens if spec.tasks.caption else 0,
            TAGS: spec.tasks.tags.max_new_tokens if spec.tasks.tags else 0,
            VQA: spec.tasks.vqa.max_new_tokens if spec.tasks.vqa else 0,
        }
        self.watchdog = _Watchdog(spec.batch_timeout_s) if spec.batch_timeout_s else None

    def __call__(self, table: pa.Table) -> pa.Table:
        if self.watchdog is None:
            return self._process(table)
        with self.watchdog.watching(table.num_rows):
            return self._process(table)

    def _process(self, table: pa.Table) -> pa.Table:
        started = time.perf_counter()
        tasks = table.column(rows.PROMPT_TASKS).to_pylist()
        token_ids = table.column(rows.PROMPT_IDS).to_pylist()
        inputs = table.column(rows.MODEL_INPUTS)

        work: list[tuple[int, ImagePrompts]] = []
        for row, row_tasks in enumerate(tasks):
            if not row_tasks:
                continue
            limits = [self.max_new_tokens[task] for task in row_tasks]
            work.append((row, ImagePrompts(unpack_arrays(inputs[row].as_py()), token_ids[row], limits)))
        # Images with equally long prompts (LLaVA-NeXT's image tokens vary per image) share a padded chunk.
        work.sort(key=lambda w: len(w[1].token_ids[0]))

        answers: dict[tuple[int, int], str | BaseException] = {}
        for start in range(0, len(work), self.spec.batch_size):
            chunk = work[start : start + self.spec.batch_size]
            for (row, request), result in zip(chunk, self._generate_isolating([r for _, r in chunk])):
                for slot in range(len(request.token_ids)):
                    answers[(row, slot)] = result if isinstance(result, BaseException) else result[slot]

        table = self._with_results(table, tasks, answers)
        table = table.drop_columns([c for c in _DROPPED if c in table.column_names])
        return rows.add_seconds(table, "model", time.perf_counter() - started)

    def _generate_isolating(self, items: list[ImagePrompts]) -> list[list[str] | BaseException]:
        """Every prompt's answer per image; an image whose generation fails alone gets the exception."""
        try:
            faults.inject("model.batch", batch=len(items))
            return list(self.generator.generate_for_images(items))
        except Exception as exc:  # MemoryError and torch.cuda.OutOfMemoryError included: halves need less
            if len(items) == 1:
                log.warning("generation failed for one sample: %s: %s", type(exc).__name__, exc)
                return [exc]
            log.info("a chunk of %d failed (%s); retrying it in halves", len(items), type(exc).__name__)
            self.generator.release_memory()
            half = len(items) // 2
            return self._generate_isolating(items[:half]) + self._generate_isolating(items[half:])

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
                    # the reason that explains the missing outputs
                    reasons[row] = "out_of_memory" if _is_out_of_memory(failures[0]) else "generation_failed"
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


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError))


class _Watchdog:
    """Kills this actor when one call runs past the timeout.

    A hung CUDA kernel or a deadlocked library cannot be interrupted from Python; killing the process
    is the one reliable way out, and Ray Data then restarts the actor and retries the batch
    (bounded by `stages.model.max_batch_retries`).
    """

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._deadline: float | None = None
        self._rows = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._watch, name="batch-watchdog", daemon=True).start()

    @contextmanager
    def watching(self, rows: int) -> Iterator[None]:
        with self._lock:
            self._deadline = time.monotonic() + self.timeout_s
            self._rows = rows
        try:
            yield
        finally:
            with self._lock:
                self._deadline = None

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout_s / 4))
            with self._lock:
                overdue = self._deadline is not None and time.monotonic() > self._deadline
                rows = self._rows
            if overdue:
                log.error(
                    "a batch of %d rows ran past stages.model.batch_timeout_s=%gs; killing this model actor so "
                    "Ray retries the batch on a fresh one",
                    rows,
                    self.timeout_s,
                )
                os.kill(os.getpid(), signal.SIGKILL)
