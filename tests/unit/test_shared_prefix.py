"""Several tasks, one image encoding: `Generator.generate_for_images` runs the vision tower and the prefill of
the prompts' shared prefix once per image, and must answer exactly as generating each prompt on its own does
(greedy, float32), for LLaVA and for LLaVA-NeXT, whose images take different numbers of image tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import GenerationConfig, ModelConfig
from pipeline.generator import Generator, ImagePrompts, PromptInput
from pipeline.inputs import InputBuilder, load_processor
from pipeline.testing.tiny_llava import build_tiny_llava_next

INSTRUCTIONS = [
    "Write a one-sentence caption for this image.",
    "List the objects, attributes and setting visible in this image as short comma-separated tags.",
    "What shape is in the image?",
    "Is there a circle?",
    "What colour is the background? Answer in one word.",
]
TOKEN_LIMITS = [5, 4, 3, 3, 3]


def _image(seed: int, height: int, width: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (height, width, 3), np.uint8))


def _requests(builder: InputBuilder) -> list[ImagePrompts]:
    """Differently shaped images asking different numbers of questions, so prefixes and suffixes both pad."""
    requests = []
    for seed, ((height, width), prompts) in enumerate([((40, 90), 5), ((64, 64), 2), ((90, 30), 3)]):
        arrays, replacement = builder.image_arrays(_image(seed, height, width))
        token_ids = builder.token_ids([builder.render(text) for text in INSTRUCTIONS[:prompts]], replacement)
        requests.append(ImagePrompts(arrays, token_ids, TOKEN_LIMITS[:prompts]))
    return requests


def _each_prompt_alone(generator: Generator, requests: list[ImagePrompts]) -> list[list[str]]:
    return [
        [generator.generate([PromptInput(ids, r.image)], limit)[0] for ids, limit in zip(r.token_ids, r.max_new_tokens)]
        for r in requests
    ]


def _count_vision_calls(generator: Generator) -> list[int]:
    """Pixel batches (images, or LLaVA-NeXT tiles) seen by each call of the vision tower, recorded by a
    forward hook: the real model still runs."""
    seen: list[int] = []
    generator.model.model.vision_tower.register_forward_hook(lambda module, args, output: seen.append(len(args[0])))
    return seen


@pytest.fixture(scope="module")
def llava(tiny_llava_dir: Path) -> tuple[Generator, InputBuilder]:
    config = ModelConfig(source=str(tiny_llava_dir), device="cpu", dtype="float32")
    processor = load_processor(str(tiny_llava_dir), config)
    return Generator(str(tiny_llava_dir), config, GenerationConfig(), processor), InputBuilder(processor)


def test_shared_prefix_answers_equal_each_prompt_alone(llava: tuple[Generator, InputBuilder]) -> None:
    generator, builder = llava
    requests = _requests(builder)
    assert all(generator.shared_prefix_length(r) > 0 for r in requests)
    assert generator.generate_for_images(requests) == _each_prompt_alone(generator, requests)


def test_shared_prefix_holds_every_image_token_and_leaves_each_prompt_a_suffix(
    llava: tuple[Generator, InputBuilder],
) -> None:
    generator, builder = llava
    [request, *_] = _requests(builder)
    length = generator.shared_prefix_length(request)
    first = request.token_ids[0]
    assert first[:length].count(generator.image_token_id) == first.count(generator.image_token_id) == 16
    assert all(ids[:length] == first[:length] for ids in request.token_ids)
    assert all(len(ids) > length for ids in request.token_ids)
    assert len({ids[length] for ids in request.token_ids}) > 1, "the prefix should end where the prompts part"


def test_the_vision_tower_runs_once_per_image(llava: tuple[Generator, InputBuilder]) -> None:
    generator, builder = llava
    requests = _requests(builder)
    seen = _count_vision_calls(generator)
    generator.generate_for_images(requests)
    assert seen == [len(requests)]


def test_a_single_prompt_or_beam_search_generates_whole_prompts(
    tiny_llava_dir: Path, llava: tuple[Generator, InputBuilder]
) -> None:
    generator, builder = llava
    requests = _requests(builder)
    single = ImagePrompts(requests[0].image, requests[0].token_ids[:1], [5])
    assert generator.shared_prefix_length(single) == 0
    assert generator.generate_for_images([single]) == _each_prompt_alone(generator, [single])

    config = ModelConfig(source=str(tiny_llava_dir), device="cpu", dtype="float32")
    processor = load_processor(str(tiny_llava_dir), config)
    beams = Generator(str(tiny_llava_dir), config, GenerationConfig(num_beams=2), processor)
    assert beams.shared_prefix_length(requests[0]) == 0
    assert beams.generate_for_images(requests[1:2]) == _each_prompt_alone(beams, requests[1:2])


def test_llava_next_shared_prefixes_of_different_lengths_answer_as_each_prompt_alone(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    checkpoint = build_tiny_llava_next(tmp_path_factory.mktemp("llava-next") / "ckpt")
    config = ModelConfig(source=str(checkpoint), device="cpu", dtype="float32")
    processor = load_processor(str(checkpoint), config)
    generator = Generator(str(checkpoint), config, GenerationConfig(), processor)
    requests = _requests(InputBuilder(processor))
    prefix_lengths = {generator.shared_prefix_length(r) for r in requests}
    assert len(prefix_lengths) > 1 and 0 not in prefix_lengths, "the test needs images that tile differently"
    seen = _count_vision_calls(generator)
    shared = generator.generate_for_images(requests)
    assert len(seen) == 1, "the shared path encodes every image in one call"
    assert shared == _each_prompt_alone(generator, requests)
