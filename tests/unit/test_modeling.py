"""Unit tests for pipeline.inputs and pipeline.generator on a tiny random-weight LLaVA checkpoint (CPU, float32)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pixels import model_pixels

from pipeline.config import GenerationConfig, ModelConfig
from pipeline.errors import ConfigError
from pipeline.generator import Generator, PromptInput, collate_images, resolve_device, resolve_dtype
from pipeline.inputs import InputBuilder, load_processor, pack_arrays, unpack_arrays
from pipeline.testing.tiny_llava import LLAVA_CHAT_TEMPLATE

CAPTION = "Write a one-sentence caption for this image."
QUESTION = "What shape is in the image? What colour is the background? Answer in one word."


@pytest.fixture(scope="module")
def model_config(tiny_llava_dir: Path) -> ModelConfig:
    return ModelConfig(source=str(tiny_llava_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def processor(tiny_llava_dir: Path, model_config: ModelConfig):
    return load_processor(str(tiny_llava_dir), model_config)


@pytest.fixture(scope="module")
def builder(processor) -> InputBuilder:
    return InputBuilder(processor)


@pytest.fixture(scope="module")
def generator(tiny_llava_dir: Path, model_config: ModelConfig, processor) -> Generator:
    return Generator(str(tiny_llava_dir), model_config, GenerationConfig(), processor)


@pytest.fixture(scope="module")
def no_template_dir(tiny_llava_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint's processor files with every trace of the chat template removed."""
    target = tmp_path_factory.mktemp("no_template")
    for item in tiny_llava_dir.iterdir():
        if item.name == "chat_template.jinja" or item.suffix == ".safetensors":
            continue
        shutil.copy(item, target / item.name)
    for name in ("processor_config.json", "tokenizer_config.json"):
        path = target / name
        if path.exists():
            config = json.loads(path.read_text())
            config.pop("chat_template", None)
            path.write_text(json.dumps(config))
    return target


def prompt_input(builder: InputBuilder, image: Image.Image, instruction: str) -> PromptInput:
    arrays, replacement = builder.image_arrays(image)
    return PromptInput(builder.token_ids([builder.render(instruction)], replacement)[0], arrays)


# --- processor and chat template -----------------------------------------------------------------


def test_load_processor_returns_an_image_text_processor_with_chat_template(processor) -> None:
    assert processor.chat_template == LLAVA_CHAT_TEMPLATE
    assert processor.image_token == "<image>"
    assert hasattr(processor, "image_processor") and hasattr(processor, "tokenizer")


def test_render_applies_the_chat_template_with_one_image_token(builder: InputBuilder) -> None:
    assert builder.render(CAPTION) == f"USER: <image>\n{CAPTION} ASSISTANT:"


def test_load_processor_without_chat_template_asks_for_model_chat_template(no_template_dir: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_processor(str(no_template_dir), ModelConfig(source=str(no_template_dir)))
    assert "model.chat_template" in str(info.value)
    assert str(info.value).startswith("model.source: ")


def test_chat_template_override_is_used(no_template_dir: Path) -> None:
    template = "{% for m in messages %}Q: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} A:"
    processor = load_processor(str(no_template_dir), ModelConfig(source=str(no_template_dir), chat_template=template))
    assert processor.chat_template == template
    assert InputBuilder(processor).render("Hi?") == "Q: <image>Hi? A:"


def test_load_processor_from_a_dir_without_a_processor_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^model.source: cannot load a processor from "):
        load_processor(str(tmp_path), ModelConfig(source=str(tmp_path)))


def test_template_placing_two_image_tokens_is_rejected(no_template_dir: Path) -> None:
    template = "{% for m in messages %}<image><image>{% endfor %}"
    processor = load_processor(str(no_template_dir), ModelConfig(source=str(no_template_dir), chat_template=template))
    with pytest.raises(ConfigError, match="placed 2 image tokens"):
        InputBuilder(processor).render("x")


# --- faithfulness to processor(images=..., text=...) ------------------------------------------------


@pytest.mark.parametrize("size", [(64, 48), (17, 90)], ids=["landscape", "tall"])
@pytest.mark.parametrize("instruction", [CAPTION, QUESTION], ids=["caption", "question"])
def test_token_ids_match_the_processor_exactly(
    processor, builder: InputBuilder, size: tuple[int, int], instruction: str
) -> None:
    image = Image.new("RGB", size, (200, 30, 30))
    rendered = builder.render(instruction)
    arrays, replacement = builder.image_arrays(image)
    ids = builder.token_ids([rendered], replacement)

    reference = processor(images=[image], text=[rendered], return_tensors="np")
    assert ids == [reference["input_ids"][0].tolist()]
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    # (32 / 8) ** 2 patches; the CLS token is dropped by vision_feature_select_strategy="default".
    assert ids[0].count(image_token_id) == 16
    assert set(arrays) == {"pixel_values"}
    assert arrays["pixel_values"].dtype == np.uint8, "pixels travel as uint8; the model actor scales them"
    np.testing.assert_allclose(model_pixels(processor, arrays), reference["pixel_values"][0], rtol=0, atol=1e-6)


def test_token_ids_for_several_prompts_share_one_image(processor, builder: InputBuilder) -> None:
    image = Image.new("RGB", (40, 40), (0, 0, 200))
    rendered = [builder.render(CAPTION), builder.render(QUESTION)]
    _, replacement = builder.image_arrays(image)
    ids = builder.token_ids(rendered, replacement)
    for text, row in zip(rendered, ids):
        assert row == processor(images=[image], text=[text], return_tensors="np")["input_ids"][0].tolist()


# --- array packing and collation ------------------------------------------------------------------


def test_pack_unpack_round_trip() -> None:
    arrays = {
        "pixel_values": np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4),
        "image_sizes": np.array([48, 64], dtype=np.int64),
    }
    restored = unpack_arrays(pack_arrays(arrays))
    assert set(restored) == set(arrays)
    for name, value in arrays.items():
        assert restored[name].dtype == value.dtype
        np.testing.assert_array_equal(restored[name], value)


def test_collate_stacks_equal_shapes() -> None:
    a = {"pixel_values": np.ones((3, 2, 2), np.float32)}
    b = {"pixel_values": np.full((3, 2, 2), 2.0, np.float32)}
    batch = collate_images([a, b])
    assert batch["pixel_values"].shape == (2, 3, 2, 2)
    assert batch["pixel_values"].dtype == torch.float32
    assert torch.equal(batch["pixel_values"][1], torch.full((3, 2, 2), 2.0))


def test_collate_pads_ragged_leading_axes_with_zeros() -> None:
    a = {"pixel_values": np.ones((2, 3), np.float32), "image_sizes": np.array([10, 20])}
    b = {"pixel_values": np.full((4, 3), 5.0, np.float32), "image_sizes": np.array([30, 40])}
    batch = collate_images([a, b])
    assert batch["pixel_values"].shape == (2, 4, 3)
    assert torch.equal(batch["pixel_values"][0, :2], torch.ones(2, 3))
    assert torch.equal(batch["pixel_values"][0, 2:], torch.zeros(2, 3))
    assert torch.equal(batch["pixel_values"][1], torch.full((4, 3), 5.0))
    assert batch["image_sizes"].tolist() == [[10, 20], [30, 40]]


# --- device and dtype ---------------------------------------------------------------------------


def test_cpu_device_defaults_to_float32() -> None:
    config = ModelConfig(source="x", device="cpu")
    device = resolve_device(config)
    assert device == torch.device("cpu")
    assert resolve_dtype(config, device) == torch.float32
    assert resolve_dtype(ModelConfig(source="x", dtype="bfloat16"), device) == torch.bfloat16


# --- generation ---------------------------------------------------------------------------------------


def test_generator_loads_on_cpu_in_float32(generator: Generator) -> None:
    assert generator.device == torch.device("cpu")
    assert generator.dtype == torch.float32
    assert generator.generate_kwargs["do_sample"] is False
    assert generator.generate_kwargs["pad_token_id"] == generator.tokenizer.pad_token_id


def test_left_padded_batch_matches_generating_each_prompt_alone(generator: Generator, builder: InputBuilder) -> None:
    short = prompt_input(builder, Image.new("RGB", (64, 48), (200, 30, 30)), CAPTION)
    long = prompt_input(builder, Image.new("RGB", (30, 30), (0, 0, 200)), QUESTION)
    assert len(short.token_ids) < len(long.token_ids)  # so the batch really is left-padded

    batched = generator.generate([short, long], max_new_tokens=5)
    alone = [generator.generate([short], max_new_tokens=5)[0], generator.generate([long], max_new_tokens=5)[0]]
    # Greedy decoding of a float32 model on CPU: padding is masked out, so each sequence's logits are computed
    # from exactly the same values with or without its neighbour. Verified exact for this tiny model; if a future
    # kernel made it flaky, comparing the generated token ids would be the next-best check.
    assert batched == alone
    assert len(batched) == 2 and all(isinstance(text, str) for text in batched)


def test_generation_is_deterministic(generator: Generator, builder: InputBuilder) -> None:
    item = prompt_input(builder, Image.new("RGB", (32, 32), (20, 200, 20)), CAPTION)
    assert generator.generate([item], max_new_tokens=4) == generator.generate([item], max_new_tokens=4)


def test_max_new_tokens_bounds_the_output(
    generator: Generator, builder: InputBuilder, monkeypatch: pytest.MonkeyPatch
) -> None:
    item = prompt_input(builder, Image.new("RGB", (32, 32), (20, 200, 20)), CAPTION)
    shapes: list[tuple[int, ...]] = []
    real_generate = generator.model.generate

    def recording_generate(**kwargs):
        output = real_generate(**kwargs)
        shapes.append((kwargs["input_ids"].shape[1], output.shape[1]))
        return output

    monkeypatch.setattr(generator.model, "generate", recording_generate)
    [text] = generator.generate([item], max_new_tokens=3)
    [(prompt_length, total_length)] = shapes
    assert prompt_length == len(item.token_ids)
    assert 1 <= total_length - prompt_length <= 3
    assert isinstance(text, str)
