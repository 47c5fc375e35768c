"""Model inputs on the CPU: the checkpoint's processor, its chat template, and one image's inputs.

Everything goes through transformers' own classes: `AutoProcessor` for the image processor,
tokenizer and chat template, and the processor's `replace_image_token` for how many image tokens a
picture takes. `InputBuilder.build` makes an image's inputs as `processor(images=..., text=...)` would, once per
image on a CPU worker, so the model actor (`pipeline.generator`) only pads, stacks and generates.

Two things keep the CPU side cheap without changing what the model sees:

- pixels travel as the processor's resized and cropped `uint8` values, a quarter of float32's bytes
  (338 KB instead of 1.35 MB an image at 336 px); the model actor applies the processor's own
  rescale and normalisation (`PixelScaling`) on its device. The result differs from the processor's
  float32 arrays by float rounding only (at most 1e-6, checked in tests/unit/test_inputs_fast.py);
- `decode_size` tells the decoder how small an image may be decoded (Pillow's JPEG draft mode
  decodes at 1/2, 1/4 or 1/8 scale, never below the size the processor resizes to).

Nothing here imports torch.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Sequence

import numpy as np
from PIL import Image

from pipeline.config import ModelConfig
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)


@cache
def torchvision_available() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


def load_processor(model_dir: str, config: ModelConfig):
    """The checkpoint's processor, checked to be an image-text processor with a chat template."""
    from transformers import AutoProcessor

    kwargs: dict[str, object] = {"trust_remote_code": config.trust_remote_code}
    if not torchvision_available():
        # transformers would pick the PIL backend anyway, but warns in every actor when left to choose.
        kwargs["backend"] = "pil"
    try:
        processor = AutoProcessor.from_pretrained(model_dir, **kwargs)
    except Exception as exc:
        raise ConfigError(f"model.source: cannot load a processor from {model_dir}: {exc}") from None
    if config.chat_template is not None:
        processor.chat_template = config.chat_template
    for needed in ("image_processor", "tokenizer", "replace_image_token"):
        if not hasattr(processor, needed):
            raise ConfigError(f"model.source: {type(processor).__name__} is not an image-text processor (no {needed})")
    if not getattr(processor, "chat_template", None):
        raise ConfigError("model.source: the checkpoint ships no chat template; set model.chat_template")
    return processor


def render_every_prompt(model_dir: str, config: ModelConfig, instructions: Sequence[str]) -> None:
    """The plan's check that a checkpoint's processor loads and its chat template renders each instruction
    with the image (a ConfigError naming the field if not)."""
    builder = InputBuilder(load_processor(model_dir, config))
    for instruction in instructions:
        builder.render(instruction)


@dataclass(frozen=True)
class ModelInputs:
    """One image's model inputs: the image processor's arrays (batch axis removed) and every prompt's token ids."""

    arrays: dict[str, np.ndarray]
    token_ids: list[list[int]]


@dataclass(frozen=True)
class PixelScaling:
    """What the image processor does to resized pixels: `x * rescale_factor`, then `(x - mean) / std`
    per channel (either step absent where the processor's config turns it off)."""

    rescale_factor: float | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    @classmethod
    def of(cls, image_processor) -> "PixelScaling":
        def channels(value) -> tuple[float, ...]:
            return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),)

        rescale = float(image_processor.rescale_factor) if getattr(image_processor, "do_rescale", False) else None
        normalize = getattr(image_processor, "do_normalize", False)
        return cls(
            rescale_factor=rescale,
            mean=channels(image_processor.image_mean) if normalize else None,
            std=channels(image_processor.image_std) if normalize else None,
        )


def ships_uint8(image_processor) -> bool:
    """True when this image processor can hand back resized `uint8` pixels (rescale and normalise off)
    for the model actor to scale; probed once on a small image, since backends differ."""
    if not all(hasattr(image_processor, name) for name in ("do_rescale", "do_normalize", "rescale_factor")):
        return False
    probe = Image.new("RGB", (64, 48), (120, 60, 30))
    try:
        processed = image_processor([probe], return_tensors="np", do_rescale=False, do_normalize=False)
    except Exception:  # a processor that does not take the flags keeps the float path
        return False
    return np.asarray(processed["pixel_values"]).dtype == np.uint8


class InputBuilder:
    """Turns a decoded image and its prompts into model inputs, as the processor would."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token: str = processor.image_token
        self.image_processor = processor.image_processor
        self.uint8_pixels = ships_uint8(self.image_processor)
        self._render = lru_cache(maxsize=4096)(self._render_uncached)
        # Every image of a LLaVA-1.5 job has the same image-token expansion, and LLaVA-NeXT only a few:
        # each (prompts, expansion) pair is tokenised once.
        self._token_ids = lru_cache(maxsize=1024)(self._token_ids_uncached)

    def _render_uncached(self, instruction: str) -> str:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
        text = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        if text.count(self.image_token) != 1:
            raise ConfigError(
                f"model: the chat template placed {text.count(self.image_token)} image tokens in a one-image prompt"
            )
        return text

    def render(self, instruction: str) -> str:
        return self._render(instruction)

    def build(self, image: Image.Image, instructions: Sequence[str]) -> ModelInputs:
        """Everything the model needs for one image and its prompts: the one place model inputs are made."""
        arrays, replacement = self.image_arrays(image)
        return ModelInputs(arrays, self.prompt_ids(instructions, replacement))

    def prompt_ids(self, instructions: Sequence[str], replacement: str) -> list[list[int]]:
        """Each instruction rendered through the chat template, its image token expanded to `replacement`."""
        return self.token_ids([self.render(instruction) for instruction in instructions], replacement)

    def image_arrays(self, image: Image.Image) -> tuple[dict[str, np.ndarray], str]:
        """The image processor's outputs for one image (batch axis removed) and its image-token text.

        `pixel_values` is `uint8` where the processor allows it (`PixelScaling` then finishes the job on
        the model actor), else the processor's own float array."""
        flags = {"do_rescale": False, "do_normalize": False} if self.uint8_pixels else {}
        processed = self.image_processor([image], return_tensors="np", **flags)
        replacement = self.processor.replace_image_token(processed, image_idx=0)
        arrays = {name: np.asarray(value)[0] for name, value in processed.items()}
        return arrays, replacement

    def decode_size(self, width: int, height: int) -> tuple[int, int] | None:
        """The smallest (width, height) an image of this size may be decoded at (`smallest_decode_size`)."""
        return smallest_decode_size(self.image_processor, width, height)

    def token_ids(self, rendered: Sequence[str], replacement: str) -> list[list[int]]:
        return [list(ids) for ids in self._token_ids(tuple(rendered), replacement)]

    def _token_ids_uncached(self, rendered: tuple[str, ...], replacement: str) -> tuple[tuple[int, ...], ...]:
        expanded = [text.replace(self.image_token, replacement, 1) for text in rendered]
        # The processor's own rule: a template that writes BOS itself must not get a second one.
        bos = self.tokenizer.bos_token
        add_special = not (bos and expanded and expanded[0].startswith(bos))
        encoded = self.tokenizer(expanded, add_special_tokens=add_special)
        return tuple(tuple(ids) for ids in encoded["input_ids"])


def smallest_decode_size(image_processor, width: int, height: int) -> tuple[int, int] | None:
    """The smallest (width, height) an image of this size may be decoded at without changing what the
    image processor resizes it to; None where decoding smaller could change it.

    Processors that tile at several resolutions (LLaVA-NeXT's any-resolution grid) pick the grid from the
    decoded size and report it as `image_sizes`, so they always get the full image."""
    processor = image_processor
    if getattr(processor, "image_grid_pinpoints", None) or not getattr(processor, "do_resize", False):
        return None
    size = getattr(processor, "size", None) or {}
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    if get("shortest_edge"):
        scale = get("shortest_edge") / min(width, height)
        return (math.ceil(width * scale), math.ceil(height * scale)) if scale < 1 else None
    if get("height") and get("width"):
        return (get("width"), get("height")) if get("width") < width and get("height") < height else None
    return None


def largest_decode_size(*sizes: tuple[int, int] | None) -> tuple[int, int] | None:
    """The decode size that serves every processor given theirs: the largest, or None (full size) if any is."""
    if not sizes or any(size is None for size in sizes):
        return None
    return (max(size[0] for size in sizes), max(size[1] for size in sizes))  # type: ignore[index]


def load_image_processor(model_dir: str, field: str):
    """The image processor of a checkpoint's processor files (an embedding model's), for pixels alone."""
    from transformers import AutoImageProcessor

    kwargs: dict[str, object] = {} if torchvision_available() else {"backend": "pil"}
    try:
        return AutoImageProcessor.from_pretrained(model_dir, **kwargs)
    except Exception as exc:
        raise ConfigError(f"{field}: cannot load an image processor from {model_dir}: {exc}") from None


class PixelBuilder:
    """One decoded image's pixel inputs for an image tower alone (the embed stage's CLIP), as
    `image_processor(images=[image])["pixel_values"][0]` would make them, packed to travel compactly:

    - `uint8` resized pixels where the processor allows it (`ships_uint8`); the embed actor finishes them
      with `PixelScaling` (what the model stage does for LLaVA): equal to the processor's float32 values
      up to float rounding (1e-6);
    - otherwise the processor's float values as float16 (half the bytes; within 1e-3 relative of them).
    """

    def __init__(self, image_processor):
        self.image_processor = image_processor
        self.uint8_pixels = ships_uint8(image_processor)

    def build(self, image: Image.Image) -> bytes:
        flags = {"do_rescale": False, "do_normalize": False} if self.uint8_pixels else {}
        pixels = np.asarray(self.image_processor([image], return_tensors="np", **flags)["pixel_values"])[0]
        return pack_arrays({"pixel_values": pixels if self.uint8_pixels else pixels.astype(np.float16)})

    def decode_size(self, width: int, height: int) -> tuple[int, int] | None:
        return smallest_decode_size(self.image_processor, width, height)


def pack_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def unpack_arrays(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}
