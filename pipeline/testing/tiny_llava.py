"""A tiny LLaVA checkpoint built from configs, with a tokenizer trained locally.

It uses the real transformers classes (CLIP vision tower, projector, Llama decoder, LlavaProcessor)
and is saved with `save_pretrained`, so tests and the demo load it through exactly the path a real
checkpoint takes. Nothing is downloaded. Weights are random unless trained elsewhere; outputs are
deterministic for a given seed.
"""

from __future__ import annotations

from pathlib import Path

# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT:"), as a processor chat template.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %} "
    "{% else %}ASSISTANT: {% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

_CORPUS = [
    "USER: <image>\nWrite a one-sentence caption for this image. ASSISTANT: a red circle on a blue background",
    "List the objects, attributes and setting visible in this image as short comma-separated tags.",
    "red, green, blue, yellow, purple, orange, white, black, gray, circle, square, triangle, star, background",
    "What shape is in the image? What colour is the shape? What colour is the background? Is there a circle?",
    "yes no a an the on of in with and photo picture image small large dark light",
]


def build_tokenizer(vocab_size: int = 512, corpus: list[str] | None = None):
    """A byte-level BPE tokenizer trained on a small corpus: any text encodes, common words stay short."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((corpus or _CORPUS) * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


def _text_config(tokenizer, text_hidden: int, text_layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=text_hidden,
        intermediate_size=text_hidden * 2,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _vision_config(image_size: int, patch_size: int, vision_hidden: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )


def _image_processor_class(name: str):
    """The torchvision image processor where torchvision is installed, else its PIL twin; both save
    the same `image_processor_type`, and asking for the first without torchvision only logs a warning."""
    import transformers

    from pipeline.inputs import torchvision_available

    return getattr(transformers, name if torchvision_available() else f"{name}Pil")


def _build(path: str | Path, *, seed: int, config, model_class, processor) -> Path:
    import torch

    torch.manual_seed(seed)
    model = model_class(config)
    tokenizer = processor.tokenizer
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_tiny_llava(
    path: str | Path,
    *,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    text_hidden: int = 64,
    text_layers: int = 2,
    vocab_size: int = 512,
    tokenizer=None,
) -> Path:
    """Save a tiny LlavaForConditionalGeneration and its LlavaProcessor under `path`."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = tokenizer or build_tokenizer(vocab_size)
    config = LlavaConfig(
        vision_config=_vision_config(image_size, patch_size, vision_hidden),
        text_config=_text_config(tokenizer, text_hidden, text_layers),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    processor = LlavaProcessor(
        image_processor=_image_processor_class("CLIPImageProcessor")(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
        ),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return _build(path, seed=seed, config=config, model_class=LlavaForConditionalGeneration, processor=processor)


def build_tiny_llava_next(path: str | Path, *, seed: int = 0, image_size: int = 32, patch_size: int = 8) -> Path:
    """Save a tiny LlavaNextForConditionalGeneration: images become a variable number of tiles (any-res)."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor

    tokenizer = build_tokenizer()
    pinpoints = [[image_size, image_size * 2], [image_size * 2, image_size], [image_size * 2, image_size * 2]]
    config = LlavaNextConfig(
        vision_config=_vision_config(image_size, patch_size, 32),
        text_config=_text_config(tokenizer, 64, 2),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    processor = LlavaNextProcessor(
        image_processor=_image_processor_class("LlavaNextImageProcessor")(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_grid_pinpoints=pinpoints,
        ),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return _build(path, seed=seed, config=config, model_class=LlavaNextForConditionalGeneration, processor=processor)
