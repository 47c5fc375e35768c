"""A tiny CLIP checkpoint built from configs, with a tokenizer trained locally.

Real transformers classes (`CLIPModel`, `CLIPProcessor` with a CLIP image processor and a fast
tokenizer), saved with `save_pretrained`, so tests and the demo load it through exactly the path a
real checkpoint (`openai/clip-vit-base-patch32`, a local directory, an `s3://` prefix) takes.
Weights are random unless trained (`pipeline.tools.train_clip`); nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.testing.tiny_llava import _image_processor_class

# </s> must not get id 2: CLIPTextModel treats eos_token_id == 2 as an old checkpoint's and pools at the
# highest token id instead of the end-of-text token, i.e. at some word, seeing only the words before it.
CLIP_SPECIAL_TOKENS = ["<unk>", "<s>", "<pad>", "</s>"]

_CORPUS = [
    "a red circle on a blue background",
    "a green square on a yellow background",
    "a purple triangle on a white background",
    "an orange star on a black background",
    "red, green, blue, yellow, purple, orange, white, black, gray, circle, square, triangle, star, background",
    "a photo of an image picture with the small large dark light shape colour",
]


def build_clip_tokenizer(vocab_size: int = 512, corpus: list[str] | None = None, max_length: int = 64):
    """A byte-level BPE tokenizer that wraps every text in <s> ... </s>, as CLIP's does: the text tower
    pools at the end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=CLIP_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((corpus or _CORPUS) * 4, trainer)
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=max_length,
    )


def tiny_clip_model(
    tokenizer,
    *,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    text_hidden: int = 32,
    text_layers: int = 2,
    projection_dim: int = 32,
    attention_heads: int = 2,
    vision_intermediate: int | None = None,
):
    """A CLIPModel with random weights (seeded), its text tower sized for `tokenizer` (`vision_intermediate`:
    the image tower's MLP width, twice its hidden size unless given)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": text_hidden,
            "intermediate_size": text_hidden * 2,
            "num_hidden_layers": text_layers,
            "num_attention_heads": attention_heads,
            "max_position_embeddings": tokenizer.model_max_length,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": vision_hidden,
            "intermediate_size": vision_intermediate or vision_hidden * 2,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": attention_heads,
            "image_size": image_size,
            "patch_size": patch_size,
        },
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    return CLIPModel(config)


def clip_processor(tokenizer, image_size: int = 32, *, squash: bool = False):
    """A CLIPProcessor whose image processor resizes the short side to `image_size` and crops the centre,
    as CLIP's does; with `squash`, it resizes the whole image to a square instead, so a shape near the
    edge of a wide or tall image is still seen."""
    from transformers import CLIPProcessor

    resize = (
        {"size": {"height": image_size, "width": image_size}, "do_center_crop": False}
        if squash
        else {"size": {"shortest_edge": image_size}}
    )
    return CLIPProcessor(
        image_processor=_image_processor_class("CLIPImageProcessor")(
            **resize, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tokenizer,
    )


def build_tiny_clip(
    path: str | Path,
    *,
    image_size: int = 32,
    tokenizer=None,
    model=None,
    squash: bool = False,
    **architecture: int,
) -> Path:
    """Save a tiny CLIPModel and its CLIPProcessor (see `clip_processor` for `squash`) under `path`
    (`model`: trained weights to save instead of fresh random ones built by `tiny_clip_model` from `seed` and
    the other `architecture` arguments)."""
    tokenizer = tokenizer or build_clip_tokenizer()
    if model is None:
        model = tiny_clip_model(tokenizer, image_size=image_size, **architecture)
    processor = clip_processor(tokenizer, image_size, squash=squash)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
