"""Model stage (GPU actors): every task for every image of a batch, in one actor call; raw answers out.

Images are sorted by prompt length, so a padded batch wastes little, and generated in chunks of at
most `batch_size` images, each with all of its prompts: the vision tower and the shared prefix of an
image's prompts run once per image (`Generator.generate_for_images`). A chunk that
raises (out of memory included) is split in halves until the failing sample is alone; that sample
becomes an error row and its neighbours keep their answers. A call that hangs past
`batch_timeout_s` kills its own actor, so Ray retries the batch on a fresh one. The answers leave as
raw texts (`_answers`, one per prompt); the parse stage turns them into output columns.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import faults, rows
from pipeline.config import GenerationConfig, ModelConfig, ModelStageConfig, TasksConfig
from pipeline.inputs import load_processor, unpack_arrays
from pipeline.model_source import ModelSource, local_model_dir
from pipeline.prompts import CAPTION, TAGS, VQA
from pipeline.stages.base import Columns, MapStage, RowStage, isolate_failures

if TYPE_CHECKING:
    from pipeline.generator import Answer

log = logging.getLogger(__name__)


TASK_TOKENS_TYPE = pa.list_(
    pa.struct(
        [
            pa.field("task", pa.string(), nullable=False),
            pa.field("prompt_tokens", pa.int32(), nullable=False),
            pa.field("generated_tokens", pa.int32(), nullable=False),
        ]
    )
)


class GenerateStage(RowStage):
    name = "model"
    output_fields = (
        pa.field(rows.ANSWERS, pa.list_(pa.string())),
        # Token accounting (schema v2): what each row cost the model.
        pa.field("prompt_tokens", pa.int32()),
        pa.field("generated_tokens", pa.int32()),
        pa.field("task_tokens", TASK_TOKENS_TYPE),
    )
    consumes = (rows.MODEL_INPUTS, rows.PROMPT_IDS)

    def __init__(
        self,
        model: ModelSource,
        model_config: ModelConfig,
        generation: GenerationConfig,
        tasks: TasksConfig,
        stage: ModelStageConfig,
    ):
        # Before the load: an actor costs its GPU from its start, whether loading or generating.
        self.started_at = time.time()
        self.actor_key = f"{socket.gethostname()}:{os.getpid()}:{self.started_at:.6f}"
        self.generator = self.load_generator(model, model_config, generation)
        self.batch_size = stage.batch_size
        self.max_new_tokens = {
            CAPTION: tasks.caption.max_new_tokens if tasks.caption else 0,
            TAGS: tasks.tags.max_new_tokens if tasks.tags else 0,
            VQA: tasks.vqa.max_new_tokens if tasks.vqa else 0,
        }
        self.watchdog = _Watchdog(stage.batch_timeout_s) if stage.batch_timeout_s else None

    def load_generator(self, model: ModelSource, model_config: ModelConfig, generation: GenerationConfig):
        """What answers the prompts: the checkpoint, fetched to this node once and loaded on this actor's device."""
        from pipeline.generator import Generator

        faults.inject("model.load")
        model_dir = local_model_dir(model, files="all")
        return Generator(model_dir, model_config, generation, load_processor(model_dir, model_config))

    def select(self, table: pa.Table) -> pa.ChunkedArray:
        """Every row the prepare stage gave prompts, even one that also recorded an error (bad metadata)."""
        return pc.is_valid(table.column(rows.PROMPT_TASKS))

    def annotate(self, table: pa.Table) -> pa.Table:
        # One timestamp per model call: the summary's steady-state figures tell the calls apart by it.
        now = datetime.now(timezone.utc)
        table = rows.set_column(table, "processed_at", pa.array([now] * table.num_rows, pa.timestamp("us", tz="UTC")))
        table = rows.set_column(table, rows.MODEL_ACTOR, pa.array([self.actor_key] * table.num_rows, pa.string()))
        return rows.set_column(
            table, rows.MODEL_ACTOR_STARTED, pa.array([self.started_at] * table.num_rows, pa.float64())
        )

    def process(self, work: pa.Table) -> Columns:
        if self.watchdog is None:
            return self._generate(work)
        with self.watchdog.watching(work.num_rows):
            return self._generate(work)

    def _generate(self, work: pa.Table) -> Columns:
        from pipeline.generator import ImagePrompts

        tasks = work.column(rows.PROMPT_TASKS).to_pylist()
        token_ids = work.column(rows.PROMPT_IDS).to_pylist()
        inputs = work.column(rows.MODEL_INPUTS)

        requests: list[tuple[int, ImagePrompts]] = []
        for row, row_tasks in enumerate(tasks):
            if not row_tasks:
                continue
            limits = [self.max_new_tokens[task] for task in row_tasks]
            requests.append((row, ImagePrompts(unpack_arrays(inputs[row].as_py()), token_ids[row], limits)))
        # Images with equally long prompts (LLaVA-NeXT's image tokens vary per image) share a padded chunk.
        requests.sort(key=lambda r: len(r[1].token_ids[0]))

        answers: list[object] = [[] for _ in tasks]
        task_tokens: list[list[dict[str, object]] | None] = [[] for _ in tasks]
        errors: list[str | None] = [None] * len(tasks)
        reasons: list[str | None] = [None] * len(tasks)
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            for (row, _), result in zip(chunk, self._generate_isolating([r for _, r in chunk])):
                if isinstance(result, BaseException):
                    answers[row] = task_tokens[row] = None
                    errors[row] = f"generation failed: {type(result).__name__}: {result}"
                    reasons[row] = "out_of_memory" if _is_out_of_memory(result) else "generation_failed"
                else:
                    answers[row] = result
                    task_tokens[row] = [
                        {"task": task, "prompt_tokens": len(ids), "generated_tokens": answer.generated_tokens}
                        for task, ids, answer in zip(tasks[row], token_ids[row], result)
                    ]
        prompt_tokens = [None if t is None else sum(p["prompt_tokens"] for p in t) for t in task_tokens]
        generated_tokens = [None if t is None else sum(p["generated_tokens"] for p in t) for t in task_tokens]
        self.metrics.count_tokens(task_tokens)
        return {
            rows.ANSWERS: answers,
            "prompt_tokens": prompt_tokens,
            "generated_tokens": generated_tokens,
            "task_tokens": task_tokens,
            "error": errors,
            "error_reason": reasons,
        }

    def _generate_isolating(self, items: list) -> list[list[Answer] | BaseException]:
        """Every prompt's answer per image; an image whose generation fails alone gets the exception."""
        return isolate_failures(
            self.generator.generate_for_images,
            items,
            fault_point="model.batch",
            what="generation",
            before_halves=self.generator.release_memory,
        )


MODEL = MapStage(
    fn=GenerateStage,
    section=lambda job: job.stages.model,
    constructor_kwargs=lambda plan: {
        "model": plan.model,
        "model_config": plan.job.model,
        "generation": plan.job.generation,
        "tasks": plan.job.tasks,
        "stage": plan.job.stages.model,
    },
)


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
