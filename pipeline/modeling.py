"""The LLaVA side: processors, chat templates, model inputs and batched generation.

Everything goes through transformers' own classes: `AutoProcessor` for the image processor,
tokenizer and chat template, the processor's `replace_image_token` for how many image tokens a
picture takes, and `AutoModelForImageTextToText` for LLaVA, LLaVA-NeXT and LLaVA-OneVision.
Model inputs are built exactly as `processor(images=..., text=...)` builds them, but per image on
the CPU stage, so the GPU actor only pads, stacks and generates.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from pipeline.config import GenerationConfig, ModelConfig
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


def resolve_device(config: ModelConfig) -> torch.device:
    if config.device == "cpu":
        return torch.device("cpu")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is cuda but this actor sees no GPU (give the model stage num_gpus > 0)")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(config: ModelConfig, device: torch.device) -> torch.dtype:
    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@dataclass
class PromptInput:
    """One prompt for one image, ready to batch."""

    token_ids: list[int]
    image: dict[str, np.ndarray]


class Generator:
    """A loaded model that generates text for padded batches of (prompt, image) sequences."""

    def __init__(self, model_dir: str, config: ModelConfig, generation: GenerationConfig, processor):
        from transformers import AutoModelForImageTextToText

        self.device = resolve_device(config)
        self.dtype = resolve_dtype(config, self.device)
        self.tokenizer = processor.tokenizer
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        kwargs: dict[str, object] = {"dtype": self.dtype, "trust_remote_code": config.trust_remote_code}
        if config.attn_implementation is not None:
            kwargs["attn_implementation"] = config.attn_implementation
        self.model = AutoModelForImageTextToText.from_pretrained(model_dir, device_map=str(self.device), **kwargs)
        self.model.eval()
        self.generate_kwargs: dict[str, object] = {
            "do_sample": generation.do_sample,
            "num_beams": generation.num_beams,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        for name in ("temperature", "top_p", "top_k", "repetition_penalty"):
            value = getattr(generation, name)
            if value is not None:
                self.generate_kwargs[name] = value
        log.info("loaded %s on %s as %s", model_dir, self.device, self.dtype)

    def generate(self, sequences: Sequence[PromptInput], max_new_tokens: int) -> list[str]:
        padded = self.tokenizer.pad(
            {"input_ids": [s.token_ids for s in sequences]},
            padding=True,
            padding_side="left",
            return_tensors="pt",
        )
        inputs: dict[str, torch.Tensor] = {
            "input_ids": padded["input_ids"].to(self.device),
            "attention_mask": padded["attention_mask"].to(self.device),
        }
        for name, tensor in collate_images([s.image for s in sequences]).items():
            tensor = tensor.to(self.device, non_blocking=True)
            inputs[name] = tensor.to(self.dtype) if tensor.is_floating_point() else tensor
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, **self.generate_kwargs)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    def release_memory(self) -> None:
        """Give cached GPU blocks back after a failed batch, so its retry in halves has room."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def collate_images(images: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack per-image processor outputs; ragged leading axes (LLaVA-NeXT patches) are zero-padded,
    which the model ignores because it slices each image's patches by its `image_sizes`."""
    batch: dict[str, torch.Tensor] = {}
    for name in images[0]:
        arrays = [image[name] for image in images]
        if any(a.shape != arrays[0].shape for a in arrays):
            longest = max(a.shape[0] for a in arrays)
            arrays = [np.concatenate([a, np.zeros((longest - a.shape[0], *a.shape[1:]), a.dtype)]) for a in arrays]
        batch[name] = torch.from_numpy(np.stack(arrays))
    return batch
