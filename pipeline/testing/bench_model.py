"""Random-weight LLaVA checkpoints for benchmarking, built from configs (nothing downloaded).

Three shapes, all LLaVA-1.5 (CLIP vision tower, two-layer projector, Llama decoder, LlavaProcessor):

- `tiny`: the test model (32-pixel images, 16 image tokens); the benchmark's mechanics, in seconds.
- `bench`: a CPU stand-in for a 7B model on a GPU: a 224-pixel CLIP tower (256 image tokens) and a
  6-layer 1024-wide decoder, about 100M parameters (~420 MB in float32). Prefilling 256 image tokens
  dominates the cost of a caption, as it does for LLaVA-1.5-7B (≈8 of ≈9 TFLOP per caption).
- `7b`: LLaVA-1.5-7B's shapes: CLIP ViT-L/14 at 336 pixels (576 image tokens, features from the
  second-to-last layer) and a 32-layer 4096-wide Llama decoder (11008 MLP, 32 heads). Its vocabulary is
  the locally trained tokenizer's, not LLaVA's 32,064 tokens, so the LM head is smaller (about 1.5% of
  a 7B caption's FLOPs). ~7B parameters: built in bfloat16 on a GPU when one is present.

Every checkpoint's `generation_config.json` sets `min_new_tokens` to the benchmark's token count, so
random weights never stop early at EOS and every run generates the same amount.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.testing.tiny_llava import LLAVA_CHAT_TEMPLATE, _image_processor_class, build_tokenizer


@dataclass(frozen=True)
class BenchShape:
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_mlp: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_mlp: int
    vision_feature_layer: int = -1

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


SHAPES: dict[str, BenchShape] = {
    "tiny": BenchShape(32, 8, 32, 2, 2, 64, 64, 2, 4, 2, 128),
    "bench": BenchShape(224, 14, 768, 4, 12, 3072, 1024, 6, 16, 16, 2816),
    "7b": BenchShape(336, 14, 1024, 24, 16, 4096, 4096, 32, 32, 32, 11008, vision_feature_layer=-2),
}


def llava_config(shape: BenchShape, tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden,
        intermediate_size=shape.vision_mlp,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
        projection_dim=shape.vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=shape.text_hidden,
        intermediate_size=shape.text_mlp,
        num_hidden_layers=shape.text_layers,
        num_attention_heads=shape.text_heads,
        num_key_value_heads=shape.text_kv_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=shape.vision_feature_layer,
    )


def build_bench_llava(path: str | Path, *, shape: str, new_tokens: int, seed: int = 0) -> Path:
    """Save a random-weight LLaVA of the named shape that always generates exactly `new_tokens` tokens
    (when the job's own limit is at least that). Returns `path`; reuses a finished build of the same recipe."""
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    spec = SHAPES[shape]
    path = Path(path)
    recipe = {"shape": shape, **asdict(spec), "new_tokens": new_tokens, "seed": seed}
    marker = path / "bench_recipe.json"
    if marker.is_file() and json.loads(marker.read_text()) == recipe:
        return path

    tokenizer = build_tokenizer()
    config = llava_config(spec, tokenizer)
    processor = LlavaProcessor(
        image_processor=_image_processor_class("CLIPImageProcessor")(
            size={"shortest_edge": spec.image_size},
            crop_size={"height": spec.image_size, "width": spec.image_size},
        ),
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    # A 7B model does not fit a CPU build in float32 on a small machine; on a GPU it is built where it runs.
    large = shape == "7b"
    device = "cuda" if large and torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if large else torch.float32
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.min_new_tokens = new_tokens
    model.generation_config.max_new_tokens = new_tokens
    path.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    marker.write_text(json.dumps(recipe))
    return path


def parameter_count(shape: str) -> int:
    """Parameters of a shape, counted on the meta device (no memory)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava_config(SHAPES[shape], build_tokenizer()))
    return sum(p.numel() for p in model.parameters())


# Real checkpoints' preprocessing, for measuring the CPU stages (`llava-pipeline bench --model none`):
# LLaVA-1.5 resizes the short side to 336 and crops the centre; LLaVA-NeXT also tiles the image at the best
# of its grid resolutions (up to 672x672 or 1008x336: up to 5 tiles of 336 and 2,000+ image tokens).
PROCESSOR_FAMILIES = ("llava-1.5", "llava-next")
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def build_family_processor(family: str):
    """The named family's processor at its real input size, with the locally trained tokenizer."""
    from transformers import LlavaNextProcessor, LlavaProcessor

    size = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}
    common = {
        "tokenizer": build_tokenizer(),
        "patch_size": 14,
        "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1,
        "chat_template": LLAVA_CHAT_TEMPLATE,
    }
    if family == "llava-1.5":
        return LlavaProcessor(image_processor=_image_processor_class("CLIPImageProcessor")(**size), **common)
    if family == "llava-next":
        image_processor = _image_processor_class("LlavaNextImageProcessor")(**size, image_grid_pinpoints=NEXT_PINPOINTS)
        return LlavaNextProcessor(image_processor=image_processor, **common)
    raise ValueError(f"family must be one of {', '.join(PROCESSOR_FAMILIES)}, not {family!r}")


def build_processor_checkpoint(path: str | Path, family: str) -> Path:
    """A checkpoint directory holding the family's processor and a model config, but no weights: what the
    prepare stage loads, and all a model stage that does not generate needs."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    path = Path(path)
    marker = path / "bench_recipe.json"
    recipe = {"family": family, "pinpoints": NEXT_PINPOINTS}
    if marker.is_file() and json.loads(marker.read_text()) == recipe:
        return path
    processor = build_family_processor(family)
    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(image_size=336, patch_size=14)
    text = LlamaConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    if family == "llava-next":
        config = LlavaNextConfig(
            vision_config=vision, text_config=text, image_token_id=image_token_id, image_grid_pinpoints=NEXT_PINPOINTS
        )
    else:
        config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id)
    path.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    config.save_pretrained(path)
    processor.save_pretrained(path)
    marker.write_text(json.dumps(recipe))
    return path
