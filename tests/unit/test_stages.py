"""Unit tests for PrepareStage and GenerateStage, called directly on literal Arrow tables (no Ray)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pytest

from pipeline import rows
from pipeline.config import DecodeConfig, GenerationConfig, ModelConfig, ModelStageConfig, StorageConfig, TasksConfig
from pipeline.generator import Answer, ImagePrompts
from pipeline.images import decode_image
from pipeline.inputs import InputBuilder, load_processor, unpack_arrays
from pipeline.model_source import ModelSource
from pipeline.stages.generate import GenerateStage
from pipeline.stages.parse import ParseStage, parse_answers
from pipeline.stages.prepare import PrepareStage
from pipeline.testing import images as tricky

SHARD = "file:///data/shard-00000.tar"
CAPTION_PROMPT = "Write a one-sentence caption for this image."
TAGS_PROMPT = "List the objects, attributes and setting visible in this image as short comma-separated tags."
JOB_QUESTION = "What shape is in the image?"
INTERNAL_MODEL_COLUMNS = [rows.MODEL_INPUTS, rows.PROMPT_IDS, rows.PROMPT_TASKS, rows.QUESTIONS]

TASKS = TasksConfig(
    caption={"prompt": CAPTION_PROMPT, "max_new_tokens": 4},
    tags={"prompt": TAGS_PROMPT, "max_new_tokens": 4, "max_tags": 5},
    vqa={
        "questions": [JOB_QUESTION],
        "sample_field": "questions",
        "max_new_tokens": 3,
        "max_questions_per_sample": 2,
    },
)

FAILING_IMAGES = {
    "truncated_jpeg": "corrupt_image",
    "broken_png": "corrupt_image",
    "zero_bytes": "empty_image",
    "text_as_jpg": "unrecognized_image",
    "decompression_bomb": "too_many_pixels",
}


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_config(tiny_llava_dir: Path) -> ModelConfig:
    return ModelConfig(source=str(tiny_llava_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def source(tiny_llava_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelSource:
    cache = tmp_path_factory.mktemp("model_cache")
    return ModelSource(source=str(tiny_llava_dir), revision=None, storage=StorageConfig(), cache_dir=str(cache))


@pytest.fixture(scope="module")
def prepare(source: ModelSource, model_config: ModelConfig) -> PrepareStage:
    return PrepareStage(model=source, model_config=model_config, tasks=TASKS, decode=DecodeConfig())


class ModelThenParse:
    """The model stage followed by the parse stage, as the dataset runs them."""

    def __init__(self, model: GenerateStage, parse: ParseStage):
        self.model = model
        self.parse = parse
        self.generator = model.generator

    def __call__(self, table: pa.Table) -> pa.Table:
        return self.parse(self.model(table))


def generate_stage(
    source: ModelSource, model_config: ModelConfig, vocabulary: frozenset[str] | None = None, batch_size: int = 4
) -> ModelThenParse:
    model = GenerateStage(
        model=source,
        model_config=model_config,
        generation=GenerationConfig(),
        tasks=TASKS,
        stage=ModelStageConfig(batch_size=batch_size, num_gpus=0),
    )
    return ModelThenParse(model, ParseStage(tasks=TASKS, vocabulary=vocabulary))


@pytest.fixture(scope="module")
def generate(source: ModelSource, model_config: ModelConfig) -> ModelThenParse:
    return generate_stage(source, model_config)


@pytest.fixture(scope="module")
def builder(tiny_llava_dir: Path, model_config: ModelConfig) -> InputBuilder:
    return InputBuilder(load_processor(str(tiny_llava_dir), model_config))


# --- literal read-stage tables ----------------------------------------------------------------------


def sample_row(
    index: int,
    image: bytes | None,
    *,
    metadata: str | None = None,
    error: str | None = None,
    error_reason: str | None = None,
) -> dict[str, Any]:
    key = f"k{index:03d}"
    return {
        rows.RECORD: rows.SAMPLE,
        "shard": SHARD,
        "key": key,
        rows.INDEX: index,
        "members": [f"{key}.jpg"],
        "image_member": f"{key}.jpg" if image is not None else None,
        rows.IMAGE_BYTES: image,
        "image_sha256": None,
        "metadata": metadata,
        "error": error,
        "error_reason": error_reason,
    }


def end_row(samples: int) -> dict[str, Any]:
    return {
        rows.RECORD: rows.SHARD_END,
        "shard": SHARD,
        rows.SHARD_SAMPLES: samples,
        rows.SHARD_STATUS: rows.SHARD_OK,
        rows.seconds_column("read"): 0.25,
    }


def read_table(*row_dicts: dict[str, Any]) -> pa.Table:
    return pa.Table.from_pylist(list(row_dicts), schema=rows.READ_SCHEMA)


def questions_json(*questions: str) -> str:
    return json.dumps({"questions": list(questions)})


def red() -> bytes:
    return tricky.rgb_jpeg(64, 48, (200, 30, 30))


def blue() -> bytes:
    return tricky.webp(40, 40, (30, 30, 200))


def green() -> bytes:
    return tricky.png_rgba(60, 30, (0, 200, 0))


# --- PrepareStage -------------------------------------------------------------------------------------


def test_prepare_decodes_good_images_and_builds_inputs(prepare: PrepareStage, builder: InputBuilder) -> None:
    out = prepare(read_table(sample_row(0, red(), metadata=questions_json("Is it red?")), sample_row(1, blue())))
    first, second = out.to_pylist()
    assert (first["image_format"], first["image_width"], first["image_height"]) == ("JPEG", 64, 48)
    assert (second["image_format"], second["image_width"], second["image_height"]) == ("WEBP", 40, 40)
    assert first["error"] is None and second["error"] is None

    arrays = unpack_arrays(first[rows.MODEL_INPUTS])
    assert set(arrays) == {"pixel_values"} and arrays["pixel_values"].shape == (3, 32, 32)

    assert first[rows.PROMPT_TASKS] == ["caption", "tags", "vqa", "vqa"]
    assert first[rows.QUESTIONS] == [JOB_QUESTION, "Is it red?"]
    assert second[rows.PROMPT_TASKS] == ["caption", "tags", "vqa"]
    assert second[rows.QUESTIONS] == [JOB_QUESTION]

    expected_arrays, replacement = builder.image_arrays(decode_image(red(), max_pixels=64_000_000).image)
    expected = builder.token_ids(
        [builder.render(text) for text in (CAPTION_PROMPT, TAGS_PROMPT, JOB_QUESTION, "Is it red?")], replacement
    )
    assert first[rows.PROMPT_IDS] == expected
    assert (arrays["pixel_values"] == expected_arrays["pixel_values"]).all()


def test_prepare_drops_image_bytes_and_adds_its_columns(prepare: PrepareStage) -> None:
    out = prepare(read_table(sample_row(0, red()), end_row(1)))
    assert rows.IMAGE_BYTES not in out.column_names
    assert out.column_names[: len(rows.READ_SCHEMA) - 1] == [n for n in rows.READ_SCHEMA.names if n != rows.IMAGE_BYTES]
    for name in (
        "image_format",
        "image_width",
        "image_height",
        *INTERNAL_MODEL_COLUMNS,
        rows.seconds_column("prepare"),
    ):
        assert name in out.column_names
    assert out.schema.field("image_width").type == pa.int32()
    assert out.schema.field(rows.PROMPT_IDS).type == pa.list_(pa.list_(pa.int32()))
    assert sum(out.column(rows.seconds_column("prepare")).to_pylist()) > 0


@pytest.mark.parametrize("name", sorted(FAILING_IMAGES))
def test_prepare_turns_bad_images_into_error_rows(prepare: PrepareStage, name: str) -> None:
    generator, decodes = tricky.TRICKY_IMAGES[name]
    assert not decodes
    out = prepare(read_table(sample_row(0, red()), sample_row(1, generator())))
    good, bad = out.to_pylist()
    assert good["error"] is None and good[rows.PROMPT_TASKS] == ["caption", "tags", "vqa"]
    assert bad["error_reason"] == FAILING_IMAGES[name]
    assert bad["error"]
    for column in ("image_format", "image_width", "image_height", *INTERNAL_MODEL_COLUMNS):
        assert bad[column] is None, column


def test_prepare_decodes_every_tricky_but_valid_image(prepare: PrepareStage) -> None:
    names = sorted(n for n, (_, decodes) in tricky.TRICKY_IMAGES.items() if decodes)
    out = prepare(read_table(*(sample_row(i, tricky.TRICKY_IMAGES[n][0]()) for i, n in enumerate(names))))
    for name, row in zip(names, out.to_pylist()):
        assert row["error"] is None, (name, row["error"])
        assert row[rows.MODEL_INPUTS] is not None, name
        assert row[rows.PROMPT_TASKS] == ["caption", "tags", "vqa"], name


def test_prepare_passes_shard_end_and_error_rows_through_untouched(prepare: PrepareStage) -> None:
    missing = "no image member (looked for jpg; found txt)"
    table = read_table(sample_row(0, None, error=missing, error_reason="no_image"), sample_row(1, red()), end_row(2))
    out = prepare(table)
    failed, ok, end = out.to_pylist()
    assert (failed["error"], failed["error_reason"]) == (missing, "no_image")
    assert failed["key"] == "k000" and failed[rows.INDEX] == 0
    assert ok["error"] is None and ok[rows.MODEL_INPUTS] is not None
    assert end[rows.RECORD] == rows.SHARD_END
    assert (end[rows.SHARD_SAMPLES], end[rows.SHARD_STATUS]) == (2, rows.SHARD_OK)
    assert end[rows.seconds_column("read")] == 0.25
    for row in (failed, end):
        for column in ("image_format", "image_width", "image_height", *INTERNAL_MODEL_COLUMNS):
            assert row[column] is None, column
    assert end["error"] is None and end["error_reason"] is None


def test_prepare_records_bad_metadata_but_still_builds_inputs(prepare: PrepareStage) -> None:
    out = prepare(
        read_table(sample_row(0, red(), metadata="{not json"), sample_row(1, red(), metadata='{"questions": 7}'))
    )
    for row in out.to_pylist():
        assert row["error_reason"] == "bad_metadata"
        assert row["error"].startswith("metadata ")
        assert row[rows.MODEL_INPUTS] is not None
        assert row[rows.PROMPT_TASKS] == ["caption", "tags", "vqa"]
        assert row[rows.QUESTIONS] == [JOB_QUESTION]
        assert row["image_format"] == "JPEG"


def test_prepare_caps_sample_questions_and_records_why(prepare: PrepareStage) -> None:
    out = prepare(read_table(sample_row(0, red(), metadata=questions_json("Q1?", "Q2?", "Q3?"))))
    [row] = out.to_pylist()
    assert row["error_reason"] == "too_many_questions"
    assert row["error"] == "the sample asks 3 questions; answered the first 2"
    assert row[rows.QUESTIONS] == [JOB_QUESTION, "Q1?", "Q2?"]
    assert row[rows.PROMPT_TASKS] == ["caption", "tags", "vqa", "vqa", "vqa"]
    assert len(row[rows.PROMPT_IDS]) == 5
    assert row[rows.MODEL_INPUTS] is not None


def test_prepare_single_string_question_from_metadata(prepare: PrepareStage) -> None:
    [row] = prepare(read_table(sample_row(0, red(), metadata='{"questions": "Is it round?"}'))).to_pylist()
    assert row[rows.QUESTIONS] == [JOB_QUESTION, "Is it round?"]
    assert row["error"] is None


# --- GenerateStage ------------------------------------------------------------------------------------


def prepared_batch(prepare: PrepareStage) -> pa.Table:
    return prepare(
        read_table(
            sample_row(0, red(), metadata=questions_json("Which colour is the large background area of this picture?")),
            sample_row(1, blue(), metadata=questions_json("Round?")),
            sample_row(2, tricky.zero_bytes()),
            sample_row(3, None, error="no image member (looked for jpg; found txt)", error_reason="no_image"),
            sample_row(4, green()),
            end_row(5),
        )
    )


def test_generate_fills_outputs_for_prepared_rows_only(prepare: PrepareStage, generate: ModelThenParse) -> None:
    before = datetime.now(timezone.utc)
    out = generate(prepared_batch(prepare))
    after = datetime.now(timezone.utc)
    result = out.to_pylist()
    assert [r["key"] for r in result] == ["k000", "k001", "k002", "k003", "k004", None]

    for row in (result[0], result[1], result[4]):
        assert isinstance(row["caption"], str)
        assert isinstance(row["tags"], list) and len(row["tags"]) <= 5
        assert all(tag == tag.strip().lower() for tag in row["tags"])
        assert row["error"] is None and row["error_reason"] is None
    assert [pair["question"] for pair in result[0]["vqa"]] == [
        JOB_QUESTION,
        "Which colour is the large background area of this picture?",
    ]
    assert [pair["question"] for pair in result[1]["vqa"]] == [JOB_QUESTION, "Round?"]
    assert [pair["question"] for pair in result[4]["vqa"]] == [JOB_QUESTION]
    assert all(isinstance(pair["answer"], str) for pair in result[0]["vqa"] + result[1]["vqa"])

    assert result[2]["error_reason"] == "empty_image" and result[3]["error_reason"] == "no_image"
    for row in (result[2], result[3], result[5]):
        assert (row["caption"], row["tags"], row["vqa"]) == (None, None, None)

    stamps = {row["processed_at"] for row in result}
    assert len(stamps) == 1
    [stamp] = stamps
    assert before - timedelta(milliseconds=1) <= stamp <= after
    assert out.schema.field("processed_at").type == pa.timestamp("us", tz="UTC")


def test_generate_output_columns(prepare: PrepareStage, generate: ModelThenParse) -> None:
    out = generate(prepared_batch(prepare))
    for column in INTERNAL_MODEL_COLUMNS:
        assert column not in out.column_names
    assert out.schema.field("vqa").type == pa.list_(
        pa.struct([pa.field("question", pa.string(), nullable=False), pa.field("answer", pa.string(), nullable=False)])
    )
    assert out.schema.field("tags").type == pa.list_(pa.string())
    assert rows.seconds_column("model") in out.column_names
    assert out.column(rows.RECORD).to_pylist()[-1] == rows.SHARD_END
    assert out.column(rows.SHARD_SAMPLES).to_pylist()[-1] == 5


def test_generate_is_independent_of_batch_composition(prepare: PrepareStage, generate: ModelThenParse) -> None:
    together = generate(prepared_batch(prepare)).to_pylist()
    alone = generate(prepare(read_table(sample_row(4, green())))).to_pylist()
    for column in ("caption", "tags", "vqa"):
        assert together[4][column] == alone[0][column]


class EchoGenerator:
    """Stands in for Generator.generate_for_images: answers each prompt with text that names that prompt."""

    def __init__(self, stage: ModelThenParse, poison: list[int] | None = None):
        self.tokenizer = stage.generator.tokenizer
        self.poison = poison
        self.calls: list[list[list[list[int]]]] = []  # per call, per image, that image's prompts

    def __call__(self, requests: Sequence[ImagePrompts]) -> list[list[Answer]]:
        self.calls.append([[list(ids) for ids in r.token_ids] for r in requests])
        if self.poison is not None and any(self.poison in call for call in self.calls[-1]):
            raise RuntimeError("poisoned batch")
        return [[self._answer(ids, limit) for ids, limit in zip(r.token_ids, r.max_new_tokens)] for r in requests]

    def _answer(self, token_ids: list[int], max_new_tokens: int) -> Answer:
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        if CAPTION_PROMPT in text:
            text = f"caption {max_new_tokens}"
        elif TAGS_PROMPT in text:
            text = "Red, Square; red, 3. Blue"
        else:
            text = f"answer to: {text}"
        return Answer(text, generated_tokens=len(text.split()))  # a count the test can tell apart per prompt


def test_each_vqa_answer_is_paired_with_its_own_question(
    prepare: PrepareStage, generate: ModelThenParse, monkeypatch: pytest.MonkeyPatch
) -> None:
    echo = EchoGenerator(generate)
    monkeypatch.setattr(generate.generator, "generate_for_images", echo)
    result = generate(prepared_batch(prepare)).to_pylist()
    for row in (result[0], result[1], result[4]):
        assert row["caption"] == "caption 4"  # the caption task's own max_new_tokens
        assert row["tags"] == ["red", "square", "blue"]
        assert row["vqa"]
        for pair in row["vqa"]:
            assert pair["answer"].startswith("answer to: ")
            assert pair["answer"].endswith(f"{pair['question']} ASSISTANT:")
    # Images are sorted by prompt length across rows, so this checks the mapping back, not luck.
    mixed = [call for call in echo.calls if len({len(ids) for image in call for ids in image}) > 1]
    assert mixed, "expected at least one batch mixing prompt lengths"


def test_each_row_counts_its_prompt_and_generated_tokens_per_task(
    prepare: PrepareStage, generate: ModelThenParse, monkeypatch: pytest.MonkeyPatch
) -> None:
    echo = EchoGenerator(generate)
    monkeypatch.setattr(generate.generator, "generate_for_images", echo)
    prepared = prepared_batch(prepare)
    limits = {"caption": 4, "tags": 4, "vqa": 3}
    expected = [
        None
        if row[rows.PROMPT_TASKS] is None
        else [
            {
                "task": task,
                "prompt_tokens": len(ids),
                "generated_tokens": echo._answer(ids, limits[task]).generated_tokens,
            }
            for task, ids in zip(row[rows.PROMPT_TASKS], row[rows.PROMPT_IDS])
        ]
        for row in prepared.to_pylist()
    ]
    assert expected.count(None) == 3  # the undecodable image, the missing one and the shard_end row

    result = generate(prepared).to_pylist()
    for row, want in zip(result, expected):
        assert row["task_tokens"] == want
        if want is None:
            assert row["prompt_tokens"] is None and row["generated_tokens"] is None
            continue
        # caption, tags, then one vqa entry per question in the order of the vqa column
        assert [t["task"] for t in want] == ["caption", "tags"] + ["vqa"] * len(row["vqa"])
        assert row["prompt_tokens"] == sum(t["prompt_tokens"] for t in want) > 0
        assert row["generated_tokens"] == sum(t["generated_tokens"] for t in want) > 0


def test_vocabulary_limits_tags(
    prepare: PrepareStage, source: ModelSource, model_config: ModelConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage = generate_stage(source, model_config, vocabulary=frozenset({"square", "blue"}))
    monkeypatch.setattr(stage.generator, "generate_for_images", EchoGenerator(stage))
    [row] = stage(prepare(read_table(sample_row(0, red())))).to_pylist()
    assert row["tags"] == ["square", "blue"]


def test_a_failing_sample_is_isolated_and_its_neighbours_keep_their_answers(
    prepare: PrepareStage, source: ModelSource, model_config: ModelConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage = generate_stage(source, model_config, batch_size=8)
    prepared = prepare(
        read_table(
            sample_row(0, red(), metadata=questions_json("Is it big?")),
            sample_row(1, blue(), metadata=questions_json("Is it bad?")),  # same length as its neighbours' questions
            sample_row(2, green(), metadata=questions_json("Is it odd?")),
            sample_row(3, red()),
            end_row(4),
        )
    )
    poisoned_row = prepared.to_pylist()[1]
    first_vqa_slot = poisoned_row[rows.PROMPT_TASKS].index("vqa")
    poison = poisoned_row[rows.PROMPT_IDS][first_vqa_slot + poisoned_row[rows.QUESTIONS].index("Is it bad?")]
    assert sum(ids == poison for row in prepared.to_pylist() for ids in row[rows.PROMPT_IDS] or []) == 1
    echo = EchoGenerator(stage, poison=poison)
    released: list[int] = []
    monkeypatch.setattr(stage.generator, "generate_for_images", echo)
    monkeypatch.setattr(stage.generator, "release_memory", lambda: released.append(1))

    result = stage(prepared).to_pylist()

    failed = result[1]
    assert failed["error_reason"] == "generation_failed"
    assert failed["error"] == "generation failed: RuntimeError: poisoned batch"
    assert (failed["caption"], failed["tags"], failed["vqa"]) == (None, None, None)
    for row, own in ((result[0], "Is it big?"), (result[2], "Is it odd?"), (result[3], None)):
        assert row["error"] is None and row["error_reason"] is None
        assert row["caption"] == "caption 4"
        assert row["tags"] == ["red", "square", "blue"]
        assert [p["question"] for p in row["vqa"]] == [JOB_QUESTION] + ([own] if own else [])
        assert all(p["answer"].endswith(f"{p['question']} ASSISTANT:") for p in row["vqa"])
    # The poisoned image first met the others in one batch, then was split off by halving.
    poisoned_calls = [call for call in echo.calls if any(poison in image for image in call)]
    assert max(len(call) for call in poisoned_calls) > 1
    assert [len(call) for call in poisoned_calls][-1] == 1
    assert released, "a failed batch should release memory before retrying its halves"
    assert result[4][rows.RECORD] == rows.SHARD_END and result[4]["error"] is None


def test_generation_failure_on_a_row_with_bad_metadata_keeps_both_messages(
    prepare: PrepareStage, source: ModelSource, model_config: ModelConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage = generate_stage(source, model_config)

    def always_fail(requests: Sequence[ImagePrompts]) -> list[list[str]]:
        raise RuntimeError("boom")

    monkeypatch.setattr(stage.generator, "generate_for_images", always_fail)
    [row] = stage(prepare(read_table(sample_row(0, red(), metadata="{not json")))).to_pylist()
    assert row["error"].startswith("metadata is not valid JSON")
    assert row["error"].endswith("; generation failed: RuntimeError: boom")
    # The reason names what left the row without outputs; both messages are kept.
    assert row["error_reason"] == "generation_failed"
    assert (row["caption"], row["tags"], row["vqa"]) == (None, None, None)


# --- the model stage's raw answers, and parsing them ------------------------------------------------


def test_model_stage_hands_raw_answers_to_the_parse_stage(prepare: PrepareStage, generate: ModelThenParse) -> None:
    prepared = prepared_batch(prepare)
    raw = generate.model(prepared)
    assert rows.ANSWERS in raw.column_names and "caption" not in raw.column_names
    answers = raw.column(rows.ANSWERS).to_pylist()
    tasks = prepared.column(rows.PROMPT_TASKS).to_pylist()
    for row in (0, 1, 4):
        assert len(answers[row]) == len(tasks[row]) and all(isinstance(a, str) for a in answers[row])
    assert answers[2] is None and answers[3] is None and answers[5] is None
    parsed = generate.parse(raw)
    for column in (rows.ANSWERS, rows.PROMPT_TASKS, rows.QUESTIONS):
        assert column not in parsed.column_names
    assert rows.seconds_column("parse") in parsed.column_names
    assert parsed.column("caption").to_pylist()[0] == answers[0][0]


def test_parse_answers_maps_each_answer_to_its_task_on_literal_texts() -> None:
    parsed = parse_answers(
        TASKS,
        ["caption", "tags", "vqa", "vqa"],
        [JOB_QUESTION, "Is it red?"],
        ["A red square.", "1. Red  2. Square, red; BLUE", "a square", "yes"],
        vocabulary=None,
    )
    assert parsed.caption == "A red square."
    assert parsed.tags == ["red", "square", "blue"]
    assert parsed.vqa == [
        {"question": JOB_QUESTION, "answer": "a square"},
        {"question": "Is it red?", "answer": "yes"},
    ]


def test_parse_answers_leaves_tasks_the_job_does_not_run_empty() -> None:
    vqa_only = TasksConfig(vqa={"sample_field": "questions"})
    assert parse_answers(vqa_only, [], [], []) == type(parse_answers(vqa_only, [], [], []))(None, None, [])
    captions = TasksConfig(caption={})
    parsed = parse_answers(captions, ["caption"], [], ["A cat."], vocabulary=frozenset({"cat"}))
    assert (parsed.caption, parsed.tags, parsed.vqa) == ("A cat.", None, None)
