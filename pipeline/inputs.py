"""Model inputs on the CPU: the checkpoint's processor, its chat template, and one image's inputs.

Everything goes through transformers' own classes: `AutoProcessor` for the image processor,
tokenizer and chat template, and the processor's `replace_image_token` for how many image tokens a
picture takes. `InputBuilder.build` makes an image's inputs exactly as `processor(images=...,
text=...)` would, once per image on a CPU worker, so the model actor (`pipeline.generator`) only
pads, stacks and generates. Nothing here imports torch.
"""

from __future__ import annotations

import io
import logging
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


@dataclass(frozen=True)
class ModelInputs:
    """One image's model inputs: the image processor's arrays (batch axis removed) and every prompt's token ids."""

    arrays: dict[str, np.ndarray]
    token_ids: list[list[int]]


class InputBuilder:
    """Turns a decoded image and its prompts into model inputs, as the processor would."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token: str = processor.image_token
        self._render = lru_cache(maxsize=4096)(self._render_uncached)

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
        """The image processor's outputs for one image (batch axis removed) and its image-token text."""
        processed = self.processor.image_processor([image], return_tensors="np")
        replacement = self.processor.replace_image_token(processed, image_idx=0)
        arrays = {name: np.asarray(value)[0] for name, value in processed.items()}
        return arrays, replacement

    def token_ids(self, rendered: Sequence[str], replacement: str) -> list[list[int]]:
        expanded = [text.replace(self.image_token, replacement, 1) for text in rendered]
        # The processor's own rule: a template that writes BOS itself must not get a second one.
        bos = self.tokenizer.bos_token
        add_special = not (bos and expanded and expanded[0].startswith(bos))
        encoded = self.tokenizer(expanded, add_special_tokens=add_special)
        return [list(ids) for ids in encoded["input_ids"]]


def pack_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def unpack_arrays(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}
