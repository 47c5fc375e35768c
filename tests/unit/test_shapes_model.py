"""The bundled shapes model loads like any checkpoint and sees the whole image; its training targets
are built the way the pipeline builds prompts."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

from pipeline.config import ModelConfig
from pipeline.inputs import InputBuilder, load_processor
from pipeline.testing.shards import COLORS, SHAPES, Scene
from pipeline.tools.train_shapes import (
    CAPTION_PROMPT,
    TAGS_PROMPT,
    ScenePool,
    TrainSettings,
    build_processor,
    presence_examples,
    step_examples,
    targets,
    train,
)

SHAPES_MODEL = Path(__file__).resolve().parents[2] / "models" / "tiny-llava-shapes"


def test_bundled_model_is_small_and_loads_through_the_pipelines_processor_path():
    weights = SHAPES_MODEL / "model.safetensors"
    assert weights.stat().st_size < 20 * 1024 * 1024
    config = json.loads((SHAPES_MODEL / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    processor = load_processor(str(SHAPES_MODEL), ModelConfig(source=str(SHAPES_MODEL)))
    builder = InputBuilder(processor)
    # A wide image is squashed whole to the tower's square, not centre-cropped: no part of it is lost.
    arrays, replacement = builder.image_arrays(Image.new("RGB", (96, 48), "red"))
    side = config["vision_config"]["image_size"]
    assert arrays["pixel_values"].shape == (3, side, side)
    assert replacement.count(processor.image_token) == (side // config["vision_config"]["patch_size"]) ** 2
    assert builder.render(CAPTION_PROMPT) == f"USER: <image>\n{CAPTION_PROMPT} ASSISTANT:"


def test_colour_and_shape_words_are_single_tokens():
    processor = load_processor(str(SHAPES_MODEL), ModelConfig(source=str(SHAPES_MODEL)))
    for word in [*COLORS, *SHAPES, "background", "yes", "no"]:
        assert len(processor.tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1, word


def test_training_targets_use_the_pipelines_prompts_and_balance_presence_questions():
    scene = Scene("star", "orange", "black")
    rng = random.Random(0)
    answers = [dict(targets(scene, rng)) for _ in range(400)]
    assert all(a[CAPTION_PROMPT] == "a orange star on a black background" for a in answers)
    assert all(a[TAGS_PROMPT] == "orange, star, black background" for a in answers)
    assert all(a["What shape is in the image?"] == "star" for a in answers)
    presence = [v for a in answers for q, v in a.items() if q.startswith("Is there a")]
    assert 150 < presence.count("yes") < 250 and presence.count("yes") + presence.count("no") == 400


def test_each_training_step_asks_every_image_a_presence_question():
    scene = Scene("circle", "red", "blue")
    rng = random.Random(1)
    steps = [step_examples(scene, rng) for _ in range(300)]
    assert all(len(examples) == 3 for examples in steps)
    presence = [answer for examples in steps for question, answer in examples if "Is there a" in question]
    assert len(presence) == 300 and 100 < presence.count("yes") < 200
    assert {examples[0][0] for examples in steps} == {CAPTION_PROMPT, TAGS_PROMPT}


def test_presence_stage_asks_each_image_about_its_own_shape_and_another_one():
    rng = random.Random(2)
    asked_absent = set()
    for shape in SHAPES:
        scene = Scene(shape, "green", "white")
        for _ in range(50):
            (own, yes), (other, no), (instruction, _) = presence_examples(scene, rng)
            assert (own, yes) == (f"Is there a {shape}?", "yes")
            assert no == "no" and other.startswith("Is there a") and other != own
            asked_absent.add(other)
            assert not instruction.startswith("Is there a")
    assert len(asked_absent) == len(SHAPES)


def test_training_pool_is_the_same_however_many_processes_draw_it(monkeypatch):
    monkeypatch.setattr(ScenePool, "CHUNK", 5)
    builder = InputBuilder(build_processor())
    one = ScenePool(builder, random.Random(0), 12, "check", workers=1)
    two = ScenePool(builder, random.Random(0), 12, "check", workers=2)
    assert one.scenes == two.scenes
    assert (one.pixels == two.pixels).all() and (one.masks == two.masks).all()
    assert one.pixels.shape[0] == 12 and one.masks.shape == (12, one.grid**2, ScenePool.CELLS**2)


def test_training_is_seeded_the_same_settings_give_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    settings = TrainSettings(
        pool=24,
        held_out=8,
        workers=1,
        vision_steps=3,
        vision_batch=8,
        steps=3,
        presence_steps=3,
        batch=6,
        warmup=2,
        threads=1,
    )
    first = load_file(train(tmp_path / "first", settings) / "model.safetensors")
    second = load_file(train(tmp_path / "second", settings) / "model.safetensors")
    assert first.keys() == second.keys()
    assert all((first[name] == second[name]).all() for name in first)
    other = load_file(
        train(tmp_path / "other", TrainSettings(**{**settings.__dict__, "seed": 1})) / "model.safetensors"
    )
    assert any((first[name] != other[name]).any() for name in first)
