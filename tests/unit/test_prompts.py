"""Unit tests for pipeline.prompts: tag parsing, vocabularies, per-sample questions and prompt order."""

from __future__ import annotations

import json

import pytest

from pipeline.config import TasksConfig
from pipeline.prompts import (
    CAPTION,
    TAGS,
    VQA,
    MetadataError,
    Prompt,
    normalize_tag,
    parse_tags,
    parse_vocabulary,
    prompts_for,
    sample_questions,
)


def tags(text: str, max_tags: int = 32, vocabulary: frozenset[str] | None = None) -> list[str]:
    return parse_tags(text, max_tags=max_tags, vocabulary=vocabulary)


# --- parse_tags ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cat, dog, bird", ["cat", "dog", "bird"]),
        ("cat; dog;bird", ["cat", "dog", "bird"]),
        ("cat\ndog\r\nbird", ["cat", "dog", "bird"]),
        ("cat\tdog", ["cat", "dog"]),
        ("cat,, ;\n dog", ["cat", "dog"]),
    ],
)
def test_tags_split_on_commas_semicolons_and_newlines(text: str, expected: list[str]) -> None:
    assert tags(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1. cat 2. dog 3. red car", ["cat", "dog", "red car"]),
        ("1) cat 2) dog", ["cat", "dog"]),
        ("10. cat 11. dog", ["cat", "dog"]),
        ("1. cat, 2. dog", ["cat", "dog"]),
    ],
)
def test_inline_numbered_lists_are_split(text: str, expected: list[str]) -> None:
    assert tags(text) == expected


def test_numbered_list_one_item_per_line_is_split() -> None:
    assert tags("1. cat\n2. dog\n3. bird") == ["cat", "dog", "bird"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- cat\n- dog\n* bird", ["cat", "dog", "bird"]),
        ("\u2022 cat \u2022 dog", ["cat", "dog"]),
        ("cat - dog - bird", ["cat", "dog", "bird"]),
    ],
)
def test_bullets_are_split_and_stripped(text: str, expected: list[str]) -> None:
    assert tags(text) == expected


def test_hyphenated_words_are_not_split() -> None:
    assert tags("t-shirt, well-lit room") == ["t-shirt", "well-lit room"]


def test_numbers_inside_tags_are_kept() -> None:
    assert tags("3 cats, 2.5 stars, 2 dogs") == ["3 cats", "2.5 stars", "2 dogs"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('  Cat , DOG. , "Bird!" ', ["cat", "dog", "bird"]),
        ("Red  Car,\tBlue   Sky", ["red car", "blue sky"]),
        ("#tag, (dog), [sky], `code`, **bold**", ["tag", "dog", "sky", "code", "bold"]),
        ("\uff23\uff21\uff34", ["cat"]),  # full-width letters, NFKC-normalized
        ("cat_", ["cat"]),
    ],
)
def test_tags_are_normalized(text: str, expected: list[str]) -> None:
    assert tags(text) == expected


def test_normalize_tag_collapses_inner_whitespace_and_keeps_inner_punctuation() -> None:
    assert normalize_tag("  Mr.   Smith's   Car!  ") == "mr. smith's car"


def test_duplicates_are_dropped_keeping_first_occurrence_order() -> None:
    assert tags("dog, Cat, cat., DOG, bird, CAT") == ["dog", "cat", "bird"]


@pytest.mark.parametrize("text", ["", "   ", ",,,;;", "\n\n", "- , *"])
def test_empty_answers_give_no_tags(text: str) -> None:
    assert tags(text) == []


def test_max_tags_keeps_the_first_n() -> None:
    assert tags("a, b, c, d, e", max_tags=2) == ["a", "b"]
    assert tags("a, b", max_tags=5) == ["a", "b"]


def test_duplicates_do_not_count_toward_max_tags() -> None:
    assert tags("a, a, A, b, c", max_tags=2) == ["a", "b"]


def test_vocabulary_filters_and_keeps_order() -> None:
    vocabulary = frozenset({"cat", "bird", "red car"})
    assert tags("Dog, Bird, cat, Red Car, tree", vocabulary=vocabulary) == ["bird", "cat", "red car"]


def test_out_of_vocabulary_tags_do_not_count_toward_max_tags() -> None:
    vocabulary = frozenset({"a", "b", "c"})
    assert tags("x, a, y, b, a, c", max_tags=2, vocabulary=vocabulary) == ["a", "b"]


def test_empty_vocabulary_drops_everything() -> None:
    assert tags("cat, dog", vocabulary=frozenset()) == []


# --- parse_vocabulary ------------------------------------------------------------------------------


def test_vocabulary_ignores_comments_and_blank_lines_and_normalizes() -> None:
    text = "cat\n# a comment line\n\n  Bird   # trailing comment\nDOG!\n  Red   Car  \n   \n#\n"
    assert parse_vocabulary(text) == frozenset({"cat", "bird", "dog", "red car"})


def test_vocabulary_entries_match_normalized_model_output() -> None:
    vocabulary = parse_vocabulary("Red Car\nBird\n")
    assert tags("RED   car., bird!, dog", vocabulary=vocabulary) == ["red car", "bird"]


def test_empty_vocabulary_text() -> None:
    assert parse_vocabulary("") == frozenset()
    assert parse_vocabulary("# only\n\n# comments\n") == frozenset()


# --- sample_questions ------------------------------------------------------------------------------


def test_string_field_is_one_question_trimmed() -> None:
    assert sample_questions(json.dumps({"q": "  What colour?  "}), "q") == ["What colour?"]


def test_list_field_keeps_order_and_drops_blank_entries() -> None:
    assert sample_questions(json.dumps({"q": ["A?", "  ", "B?", ""]}), "q") == ["A?", "B?"]


@pytest.mark.parametrize(
    "metadata",
    [json.dumps({"other": "x"}), json.dumps({"q": None}), json.dumps({}), json.dumps({"q": []})],
)
def test_missing_or_null_field_gives_no_questions(metadata: str) -> None:
    assert sample_questions(metadata, "q") == []


def test_no_field_configured_or_no_metadata_gives_no_questions() -> None:
    assert sample_questions("not even json", None) == []
    assert sample_questions(None, "q") == []


def test_invalid_json_is_a_metadata_error_with_position() -> None:
    with pytest.raises(MetadataError) as info:
        sample_questions("{not json", "q")
    assert str(info.value).startswith("metadata is not valid JSON (")
    assert "line 1 column 2" in str(info.value)


@pytest.mark.parametrize(("metadata", "kind"), [('["a?"]', "list"), ('"a?"', "str"), ("3", "int")])
def test_top_level_non_object_is_a_metadata_error(metadata: str, kind: str) -> None:
    with pytest.raises(MetadataError) as info:
        sample_questions(metadata, "q")
    assert str(info.value) == f"metadata is a JSON {kind}, not an object"


@pytest.mark.parametrize("value", [["a?", 1], [None], 5, {"a": "b"}, True])
def test_non_string_questions_are_a_metadata_error(value: object) -> None:
    with pytest.raises(MetadataError) as info:
        sample_questions(json.dumps({"q": value}), "q")
    assert str(info.value) == "metadata field 'q' must be a string or a list of strings"


def test_metadata_error_is_a_value_error() -> None:
    assert issubclass(MetadataError, ValueError)


# --- prompts_for -----------------------------------------------------------------------------------


def test_prompts_are_caption_then_tags_then_each_question() -> None:
    tasks = TasksConfig(
        caption={"prompt": "Caption it."},
        tags={"prompt": "Tag it."},
        vqa={"questions": ["Q1?"], "prompt": "{question} Answer briefly."},
    )
    assert prompts_for(tasks, ["Q1?", "Q2?"]) == [
        Prompt(CAPTION, "Caption it."),
        Prompt(TAGS, "Tag it."),
        Prompt(VQA, "Q1? Answer briefly.", "Q1?"),
        Prompt(VQA, "Q2? Answer briefly.", "Q2?"),
    ]


def test_default_vqa_template_is_the_question_itself() -> None:
    tasks = TasksConfig(vqa={"questions": ["Is it red?"]})
    assert prompts_for(tasks, ["Is it red?"]) == [Prompt(VQA, "Is it red?", "Is it red?")]


def test_every_question_slot_is_filled() -> None:
    tasks = TasksConfig(vqa={"questions": ["x"], "prompt": "Q: {question}\nRepeat: {question}"})
    assert prompts_for(tasks, ["Why?"])[0].instruction == "Q: Why?\nRepeat: Why?"


def test_braces_in_a_question_are_not_reformatted() -> None:
    tasks = TasksConfig(vqa={"questions": ["x"], "prompt": "{question} ({0} stays)"})
    assert prompts_for(tasks, ["What is {this}?"])[0].instruction == "What is {this}? ({0} stays)"


def test_questions_are_ignored_without_the_vqa_task() -> None:
    tasks = TasksConfig(caption={}, tags={})
    assert [p.task for p in prompts_for(tasks, ["Q?"])] == [CAPTION, TAGS]


def test_vqa_with_no_questions_gives_no_vqa_prompts() -> None:
    tasks = TasksConfig(caption={}, vqa={"sample_field": "questions"})
    assert [p.task for p in prompts_for(tasks, [])] == [CAPTION]
