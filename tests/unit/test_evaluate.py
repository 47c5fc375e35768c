"""The ground-truth checker behind `llava-pipeline eval` and the truth tests, on literal rows."""

from __future__ import annotations

import json

from pipeline.testing.shards import Scene, shape_presence_questions
from pipeline.tools.evaluate import JOB_QUESTIONS, PRESENCE, mismatches, render_score, score


def _row(key: str, scene: Scene, own: list[str] | None = None, **outputs: object) -> dict:
    truth = {"shape": scene.shape, "color": scene.color, "background": scene.background, "caption": scene.caption}
    if own is not None:
        truth["questions"] = own
    questions = JOB_QUESTIONS + (own or [])
    row = {
        "key": key,
        "metadata": json.dumps(truth),
        "caption": scene.caption,
        "tags": list(scene.tags),
        "vqa": [{"question": q, "answer": scene.answer(q)} for q in questions],
        "error": None,
        "error_reason": None,
    }
    row.update(outputs)
    return row


RED_CIRCLE = Scene("circle", "red", "blue")
GREEN_STAR = Scene("star", "green", "white")


def test_scene_answers_the_trained_questions():
    assert RED_CIRCLE.answer("What shape is in the image?") == "circle"
    assert RED_CIRCLE.answer("What colour is the shape?") == "red"
    assert RED_CIRCLE.answer("What colour is the background?") == "blue"
    assert RED_CIRCLE.answer("Is there a circle?") == "yes"
    assert RED_CIRCLE.answer("Is there a star?") == "no"
    assert RED_CIRCLE.answer("How many cats?") is None
    assert RED_CIRCLE.tags_text == "red, circle, blue background"


def test_shape_presence_questions_ask_one_yes_and_one_no():
    import random

    rng = random.Random(3)
    for scene in (RED_CIRCLE, GREEN_STAR):
        questions = shape_presence_questions(scene, rng)
        assert sorted(scene.answer(q) for q in questions) == ["no", "yes"]


def test_rows_with_their_own_outputs_pass_and_tags_compare_as_sets():
    rows = [
        _row("a", RED_CIRCLE, own=["Is there a star?"]),
        _row("b", GREEN_STAR, tags=["white background", "star", "green"]),
    ]
    assert mismatches(rows) == []
    result = score(rows)
    assert result.accuracy("caption") == 1.0 and result.total[PRESENCE] == 1
    assert "100.00%" in render_score(result)


def test_outputs_of_another_row_are_mismatches():
    a, b = _row("a", RED_CIRCLE), _row("b", GREEN_STAR)
    swapped = [{**a, "caption": b["caption"], "tags": b["tags"]}, {**b, "vqa": a["vqa"]}]
    problems = mismatches(swapped)
    assert any(p.startswith("a: caption 'a green star") for p in problems)
    assert any(p.startswith("a: tags") for p in problems)
    assert sum(p.startswith("b: 'What") for p in problems) == 3


def test_missing_extra_or_reordered_questions_are_mismatches():
    own = ["Is there a star?", "Is there a circle?"]
    right = _row("a", RED_CIRCLE, own=own)
    missing = {**right, "vqa": right["vqa"][:-1]}
    reordered = {**right, "vqa": right["vqa"][::-1]}
    foreign = _row("b", GREEN_STAR, vqa=right["vqa"])  # asks a's questions, though b has none of its own
    for row in (missing, reordered, foreign):
        assert mismatches([row]), row["vqa"]


def test_error_rows_and_duplicate_tags_are_wrong():
    assert mismatches([_row("a", RED_CIRCLE, error="boom", error_reason="generation_failed")])
    assert mismatches([_row("a", RED_CIRCLE, tags=["red", "circle", "blue background", "red"])])
