"""The model actor's side: a loaded LLaVA-family model generating for padded batches of images.

`AutoModelForImageTextToText` loads LLaVA, LLaVA-NeXT and LLaVA-OneVision. Inputs arrive already
built on CPU workers (`pipeline.inputs`); here they are only stacked, padded, moved to the device
and generated from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from pipeline.config import EmbedModelConfig, GenerationConfig, ModelConfig
from pipeline.inputs import PixelScaling

log = logging.getLogger(__name__)


def resolve_device(config: ModelConfig | EmbedModelConfig, field: str = "model", stage: str = "model") -> torch.device:
    """The device a model section asks for (`auto`: CUDA where this actor sees a GPU); `field` and `stage` name
    the section and its stage in the error when it asks for CUDA on an actor without a GPU."""
    if config.device == "cpu":
        return torch.device("cpu")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{field}.device is cuda but this actor sees no GPU (give the {stage} stage num_gpus > 0)")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(config: ModelConfig, device: torch.device) -> torch.dtype:
    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class Answer(str):
    """One prompt's answer: its text, carrying how many tokens the model generated for it (the end-of-sequence
    token included), which the text alone cannot tell. Compares and prints as the text."""

    generated_tokens: int

    def __new__(cls, text: str, generated_tokens: int) -> "Answer":
        answer = super().__new__(cls, text)
        answer.generated_tokens = generated_tokens
        return answer

    def __reduce__(self):
        return Answer, (str(self), self.generated_tokens)


@dataclass
class PromptInput:
    """One prompt for one image, ready to batch."""

    token_ids: list[int]
    image: dict[str, np.ndarray]


@dataclass
class ImagePrompts:
    """Every prompt asked of one image (caption, tags, each question), each with its own token limit."""

    image: dict[str, np.ndarray]
    token_ids: list[list[int]]
    max_new_tokens: list[int]


class Generator:
    """A loaded model that generates text for padded batches of (prompt, image) sequences.

    `generate_for_images` is the model stage's entry point: every prompt of one image shares the text before
    the instruction and the image tokens, so the vision tower and the prefill of that shared prefix run once
    per image, and each task's prompt continues from a copy of the prefix's KV cache (see
    `_generate_from_shared_prefixes`). Greedy outputs are the same as generating each prompt on its own.
    """

    def __init__(self, model_dir: str, config: ModelConfig, generation: GenerationConfig, processor):
        from transformers import AutoModelForImageTextToText

        self.device = resolve_device(config)
        self.dtype = resolve_dtype(config, self.device)
        self.tokenizer = processor.tokenizer
        self.pixel_scaling = PixelScaling.of(processor.image_processor)
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
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos = self.tokenizer.eos_token_id if eos is None else eos
        self.eos_token_ids: list[int] = [eos] if isinstance(eos, int) else list(eos or [])
        self.image_token_id = getattr(self.model.config, "image_token_id", None)
        # Beam search would need the shared cache expanded per beam, which generate does not do for a cache
        # passed in; beams fall back to one full prompt per sequence.
        self.shares_prefix = generation.num_beams == 1 and self.image_token_id is not None
        # Page-locked host buffers let the host-to-device copy run asynchronously (non_blocking) on a GPU.
        self.pin_memory = self.device.type == "cuda"
        log.info(
            "loaded %s on %s as %s (%s attention, %d CPU threads)",
            model_dir,
            self.device,
            self.dtype,
            getattr(self.model.config, "_attn_implementation", "default"),
            torch.get_num_threads(),
        )

    # --- inputs --------------------------------------------------------------------------------------

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.pin_memory:
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def _image_inputs(self, images: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        inputs: dict[str, torch.Tensor] = {}
        for name, tensor in collate_images(images).items():
            tensor = self._to_device(tensor)
            if name == "pixel_values" and tensor.dtype == torch.uint8:  # resized pixels, scaled here on the device
                tensor = scale_pixels(tensor, self.pixel_scaling)
            inputs[name] = tensor.to(self.dtype) if tensor.is_floating_point() else tensor
        return inputs

    def _left_pad(self, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, padded on the left as decoder-only generation needs."""
        width = max(len(ids) for ids in sequences)
        ids = np.full((len(sequences), width), self.tokenizer.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(sequences), width), dtype=np.int64)
        for row, sequence in enumerate(sequences):
            if len(sequence):
                ids[row, width - len(sequence) :] = sequence
                mask[row, width - len(sequence) :] = 1
        return self._to_device(torch.from_numpy(ids)), self._to_device(torch.from_numpy(mask))

    def _decode(self, new_tokens: torch.Tensor) -> list[Answer]:
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [Answer(text.strip(), count) for text, count in zip(texts, self._generated_counts(new_tokens))]

    def _generated_counts(self, new_tokens: torch.Tensor) -> list[int]:
        """Tokens each row generated: up to and including its first end-of-sequence token, else all of them
        (a row that hit its limit). What follows a row's end is padding, there because others ran longer."""
        width = new_tokens.shape[1]
        if not self.eos_token_ids or width == 0:
            return [width] * new_tokens.shape[0]
        ended = torch.isin(new_tokens, torch.tensor(self.eos_token_ids, device=new_tokens.device))
        first_end = torch.where(
            ended.any(dim=1), ended.int().argmax(dim=1) + 1, torch.full_like(ended[:, 0], width, dtype=torch.long)
        )
        return [int(n) for n in first_end.tolist()]

    # --- one prompt per sequence ----------------------------------------------------------------------

    def generate(self, sequences: Sequence[PromptInput], max_new_tokens: int) -> list[Answer]:
        """Each sequence as a whole prompt with its own image: the vision tower runs once per sequence."""
        input_ids, attention_mask = self._left_pad([s.token_ids for s in sequences])
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        inputs.update(self._image_inputs([s.image for s in sequences]))
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, **self.generate_kwargs)
        return self._decode(output[:, input_ids.shape[1] :])

    # --- every prompt of an image, the shared prefix computed once ---------------------------------------

    def generate_for_images(self, requests: Sequence[ImagePrompts]) -> list[list[Answer]]:
        """Answers for every prompt of every image, in the order of `requests` and their prompts."""
        answers: list[list[Answer]] = [[Answer("", 0)] * len(request.token_ids) for request in requests]
        shared: list[tuple[int, int]] = []
        alone: list[int] = []
        for index, request in enumerate(requests):
            prefix = self.shared_prefix_length(request)
            if prefix:
                shared.append((index, prefix))
            else:
                alone.append(index)
        if shared:
            self._generate_from_shared_prefixes(requests, shared, answers)
        if alone:
            for limit, members in _by_token_limit(requests, alone).items():
                members.sort(key=lambda m: len(requests[m[0]].token_ids[m[1]]))
                texts = self.generate(
                    [PromptInput(requests[i].token_ids[s], requests[i].image) for i, s in members], limit
                )
                for (index, slot), text in zip(members, texts):
                    answers[index][slot] = text
        return answers

    def shared_prefix_length(self, request: ImagePrompts) -> int:
        """Tokens at the start of every prompt of this image, image tokens included; 0 when nothing is worth
        sharing (a single prompt) or the image tokens are not all in the common part."""
        if not self.shares_prefix or len(request.token_ids) < 2:
            return 0
        first = np.asarray(request.token_ids[0])
        # generate needs at least one uncached token per prompt to produce the first logits from
        length = min(len(ids) for ids in request.token_ids) - 1
        for ids in request.token_ids[1:]:
            differs = np.flatnonzero(first[:length] != np.asarray(ids[:length]))
            if differs.size:
                length = int(differs[0])
        image_positions = np.flatnonzero(first == self.image_token_id)
        if not image_positions.size or image_positions[-1] >= length:
            return 0
        for ids in request.token_ids:
            if np.count_nonzero(np.asarray(ids) == self.image_token_id) != image_positions.size:
                return 0
        return length

    def _generate_from_shared_prefixes(
        self, requests: Sequence[ImagePrompts], shared: list[tuple[int, int]], answers: list[list[Answer]]
    ) -> None:
        """Prefill each image's shared prefix once, then generate every prompt from a copy of its cache.

        The prefixes are left-padded into one batch. Each prompt's remaining tokens (its suffix) are
        left-padded among the suffixes of its group and placed after its prefix, so a row reads
        [pad, prefix, pad, suffix]: the masked gap is never attended to, and generate derives position
        ids from the attention mask, so every token keeps the position it has in the whole prompt.
        """
        prefix_ids, prefix_mask = self._left_pad([requests[i].token_ids[0][:length] for i, length in shared])
        position_ids = (prefix_mask.cumsum(-1) - 1).masked_fill(prefix_mask == 0, 0)
        inputs = {"input_ids": prefix_ids, "attention_mask": prefix_mask, "position_ids": position_ids}
        inputs.update(self._image_inputs([requests[i].image for i, _ in shared]))
        with torch.inference_mode():
            # logits_to_keep=1: the prefix's logits are never read, and over a whole vocabulary they are not cheap
            prefix_cache = self.model(**inputs, use_cache=True, logits_to_keep=1).past_key_values
        del inputs

        position_of = {index: position for position, (index, _) in enumerate(shared)}
        prefix_length = dict(shared)
        for limit, members in _by_token_limit(requests, [i for i, _ in shared]).items():
            suffixes = [requests[i].token_ids[s][prefix_length[i] :] for i, s in members]
            order = np.argsort([len(suffix) for suffix in suffixes], kind="stable")  # little padding per batch
            members = [members[k] for k in order]
            suffix_ids, suffix_mask = self._left_pad([suffixes[k] for k in order])
            rows = torch.tensor([position_of[i] for i, _ in members], device=self.device)
            input_ids = torch.cat([prefix_ids[rows], suffix_ids], dim=1)
            attention_mask = torch.cat([prefix_mask[rows], suffix_mask], dim=1)
            with torch.inference_mode():
                output = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    past_key_values=self._prefilled_cache(prefix_cache, rows, input_ids.shape[1] + limit),
                    max_new_tokens=limit,
                    # the cache is static, and compiling for every batch shape would cost more than it saves
                    disable_compile=True,
                    **self.generate_kwargs,
                )
            for (index, slot), text in zip(members, self._decode(output[:, input_ids.shape[1] :])):
                answers[index][slot] = text

    def _prefilled_cache(self, prefix_cache, rows: torch.Tensor, length: int):
        """A cache of `length` positions per row holding the prefix of image `rows[i]` in row i.

        Static, so each generated token is written in place: a DynamicCache concatenates every layer's whole
        cache for every token, and with every prompt of every image in one batch that copying was two thirds
        of what the four prompts added to a caption cost in the CPU bench (docs/benchmarks.md).
        """
        from transformers import DynamicCache, StaticCache

        cache = StaticCache(config=self.model.config, max_cache_len=length)
        if any(layer.is_sliding for layer in cache.layers):
            # a sliding-window layer keeps only its window, which a longer prefix would not fit
            return DynamicCache(
                [(layer.keys[rows], layer.values[rows]) for layer in prefix_cache.layers], config=self.model.config
            )
        for layer, prefix in zip(cache.layers, prefix_cache.layers):
            keys, values = prefix.keys[rows], prefix.values[rows]
            layer.lazy_initialization(keys, values)
            layer.keys[:, :, : keys.shape[2]] = keys
            layer.values[:, :, : values.shape[2]] = values
            layer.cumulative_length.fill_(keys.shape[2])
        return cache

    def release_memory(self) -> None:
        """Give cached GPU blocks back after a failed batch, so its retry in halves has room."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _by_token_limit(requests: Sequence[ImagePrompts], indices: Sequence[int]) -> dict[int, list[tuple[int, int]]]:
    """(request, prompt) pairs grouped by their max_new_tokens: each group is one generate call."""
    groups: dict[int, list[tuple[int, int]]] = {}
    for index in indices:
        for slot, limit in enumerate(requests[index].max_new_tokens):
            groups.setdefault(limit, []).append((index, slot))
    return groups


def scale_pixels(pixels: torch.Tensor, scaling: PixelScaling) -> torch.Tensor:
    """Resized `uint8` pixels (channels third from last) to the processor's float32 values, where they are."""
    values = pixels.to(torch.float32)
    if scaling.rescale_factor is not None:
        values = values * scaling.rescale_factor
    if scaling.mean is not None and scaling.std is not None:
        mean = torch.tensor(scaling.mean, dtype=torch.float32, device=values.device).view(-1, 1, 1)
        std = torch.tensor(scaling.std, dtype=torch.float32, device=values.device).view(-1, 1, 1)
        values = (values - mean) / std
    return values


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
