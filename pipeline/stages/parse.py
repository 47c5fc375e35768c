"""Parse stage (Ray tasks): the model's raw answers become the `caption`, `tags` and `vqa` columns.

`parse_answers` is a pure function over one row's texts, so the rules are tested on literal
inputs; the stage only applies it to each row the model answered. Rows whose generation failed
carry no answers and pass through with their error.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import rows
from pipeline.config import TasksConfig
from pipeline.prompts import CAPTION, TAGS, VQA, parse_tags
from pipeline.stages.base import Columns, MapStage, RowStage

VQA_TYPE = pa.list_(
    pa.struct([pa.field("question", pa.string(), nullable=False), pa.field("answer", pa.string(), nullable=False)])
)


@dataclass(frozen=True)
class ParsedAnswers:
    caption: str | None
    tags: list[str] | None
    vqa: list[dict[str, str]] | None


def parse_answers(
    tasks: TasksConfig,
    prompt_tasks: list[str],
    questions: list[str],
    answers: list[str],
    vocabulary: frozenset[str] | None = None,
) -> ParsedAnswers:
    """One row's output values from its raw answers, one answer per prompt in `prompt_tasks` order.

    Columns of tasks the job does not run stay None; a job that asks questions of a sample that has
    none gets an empty `vqa` list.
    """
    by_task = list(zip(prompt_tasks, answers))
    caption = tags = vqa = None
    if tasks.caption is not None:
        caption = next(text for task, text in by_task if task == CAPTION)
    if tasks.tags is not None:
        raw = next(text for task, text in by_task if task == TAGS)
        tags = parse_tags(raw, max_tags=tasks.tags.max_tags, vocabulary=vocabulary)
    if tasks.vqa is not None:
        answered = [text for task, text in by_task if task == VQA]
        vqa = [{"question": q, "answer": a} for q, a in zip(questions, answered)]
    return ParsedAnswers(caption, tags, vqa)


class ParseStage(RowStage):
    name = "parse"
    output_fields = (
        pa.field("caption", pa.string()),
        pa.field("tags", pa.list_(pa.string())),
        pa.field("vqa", VQA_TYPE),
    )
    consumes = (rows.ANSWERS, rows.PROMPT_TASKS, rows.QUESTIONS)

    def __init__(self, tasks: TasksConfig, vocabulary: frozenset[str] | None):
        self.tasks = tasks
        self.vocabulary = vocabulary

    def select(self, table: pa.Table) -> pa.ChunkedArray:
        return pc.is_valid(table.column(rows.ANSWERS))

    def process(self, work: pa.Table) -> Columns:
        parsed = [
            parse_answers(self.tasks, prompt_tasks, questions, answers, self.vocabulary)
            for prompt_tasks, questions, answers in zip(
                work.column(rows.PROMPT_TASKS).to_pylist(),
                work.column(rows.QUESTIONS).to_pylist(),
                work.column(rows.ANSWERS).to_pylist(),
            )
        ]
        return {
            "caption": [p.caption for p in parsed],
            "tags": [p.tags for p in parsed],
            "vqa": [p.vqa for p in parsed],
        }


PARSE = MapStage(
    fn=ParseStage,
    section=lambda job: job.stages.parse,
    constructor_kwargs=lambda plan: {"tasks": plan.job.tasks, "vocabulary": plan.vocabulary},
)
