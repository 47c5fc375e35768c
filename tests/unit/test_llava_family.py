"""The LLaVA-NeXT path: any-resolution tiling gives each image its own number of tiles and image
tokens; the CPU-side inputs must still match the processor's, and ragged batches must decode as if
each image were alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pixels import model_pixels

from pipeline.config import GenerationConfig, ModelConfig
from pipeline.generator import Generator, PromptInput
from pipeline.inputs import InputBuilder, load_processor
from pipeline.testing.tiny_llava import build_tiny_llava_next


@pytest.fixture(scope="module")
def next_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava_next(tmp_path_factory.mktemp("llava-next") / "ckpt")


def _image(seed: int, height: int, width: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (height, width, 3), np.uint8))


def test_next_inputs_match_the_processor_for_differently_shaped_images(next_checkpoint: Path) -> None:
    config = ModelConfig(source=str(next_checkpoint))
    processor = load_processor(str(next_checkpoint), config)
    assert type(processor).__name__ == "LlavaNextProcessor"
    builder = InputBuilder(processor)
    rendered = builder.render("Describe the image.")
    tiles = []
    for seed, (height, width) in enumerate([(40, 90), (64, 64), (90, 30)]):
        image = _image(seed, height, width)
        arrays, replacement = builder.image_arrays(image)
        [ids] = builder.token_ids([rendered], replacement)
        reference = processor(images=[image], text=[rendered], return_tensors="np")
        assert ids == reference["input_ids"][0].tolist()
        assert arrays["pixel_values"].dtype == np.uint8
        np.testing.assert_allclose(model_pixels(processor, arrays), reference["pixel_values"][0], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(arrays["image_sizes"], reference["image_sizes"][0])
        tiles.append(arrays["pixel_values"].shape[0])
    assert len(set(tiles)) > 1, "the test needs images that tile differently"


def test_next_ragged_batch_generates_as_each_image_alone(next_checkpoint: Path) -> None:
    config = ModelConfig(source=str(next_checkpoint), device="cpu")
    processor = load_processor(str(next_checkpoint), config)
    builder = InputBuilder(processor)
    rendered = builder.render("Describe the image.")
    items = []
    for seed, (height, width) in enumerate([(40, 90), (64, 64)]):
        arrays, replacement = builder.image_arrays(_image(seed, height, width))
        [ids] = builder.token_ids([rendered], replacement)
        items.append(PromptInput(ids, arrays))
    assert items[0].image["pixel_values"].shape[0] != items[1].image["pixel_values"].shape[0]
    generator = Generator(str(next_checkpoint), config, GenerationConfig(), processor)
    together = generator.generate(items, max_new_tokens=6)
    alone = [generator.generate([item], max_new_tokens=6)[0] for item in items]
    assert together == alone
    assert all(isinstance(text, str) for text in together)
