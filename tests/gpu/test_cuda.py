"""GPU tier: the model stage on CUDA in half precision. Skipped where no CUDA device is present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import GenerationConfig, ModelConfig
from pipeline.generator import Generator, PromptInput
from pipeline.inputs import InputBuilder, load_processor
from pipeline.testing.tiny_llava import build_tiny_llava

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("gpu") / "tiny-llava")


def _items(builder: InputBuilder, count: int) -> list[PromptInput]:
    rendered = builder.render("Describe the image.")
    items = []
    for seed in range(count):
        image = Image.fromarray(np.random.RandomState(seed).randint(0, 255, (48, 64, 3), np.uint8))
        arrays, replacement = builder.image_arrays(image)
        [ids] = builder.token_ids([rendered], replacement)
        items.append(PromptInput(ids, arrays))
    return items


def test_auto_device_and_dtype_pick_cuda_half_precision(checkpoint: Path) -> None:
    config = ModelConfig(source=str(checkpoint))
    processor = load_processor(str(checkpoint), config)
    generator = Generator(str(checkpoint), config, GenerationConfig(), processor)
    assert generator.device.type == "cuda"
    assert generator.dtype in (torch.bfloat16, torch.float16)
    assert next(generator.model.parameters()).device.type == "cuda"
    texts = generator.generate(_items(InputBuilder(processor), 4), max_new_tokens=5)
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)


def test_cuda_float32_matches_cpu_float32(checkpoint: Path) -> None:
    """Same weights, same greedy decode: the GPU path must not change which image gets which answer."""
    processor = load_processor(str(checkpoint), ModelConfig(source=str(checkpoint)))
    items = _items(InputBuilder(processor), 3)
    outputs = {}
    for device in ("cpu", "cuda"):
        config = ModelConfig(source=str(checkpoint), device=device, dtype="float32", attn_implementation="eager")
        outputs[device] = Generator(str(checkpoint), config, GenerationConfig(), processor).generate(items, 5)
    assert outputs["cuda"] == outputs["cpu"]
