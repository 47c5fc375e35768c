"""Train a tiny LLaVA that sees: coloured shapes on coloured backgrounds, so its outputs can be checked.

The model is built from the real transformers classes (CLIP vision tower, LLaVA projector, Llama
decoder, LlavaProcessor with a tokenizer trained locally and the pipeline's chat template) and
trained on images from `pipeline.testing.shards`: one shape (circle, square, triangle, star) in one
of eight colours, at a random position and size, on a background of another colour, with pixel
noise, mixed sizes and aspect ratios, and JPEG/PNG/WebP at varying quality.

Targets use the pipeline's own prompts (the task defaults in `pipeline.config`), rendered and
tokenized by `pipeline.modeling.InputBuilder` exactly as the prepare stage does at inference:

  caption  "a red circle on a blue background"
  tags     "red, circle, blue background"
  vqa      "What shape is in the image?" -> "circle", "What colour is the shape?" -> "red",
           "What colour is the background?" -> "blue", "Is there a star?" -> "yes" / "no"

Training has two phases: the vision tower first learns the three attributes and the shape's
outline through throwaway heads (cheap: no decoder), then the whole LLaVA learns the answers,
with the loss on the answer tokens only. Everything is seeded, so a run with the same settings and
thread count on the same machine gives the same weights (`training.json` in the model directory
records both, with the wall time and load average):

    python -m pipeline.testing.train_shapes --out models/tiny-llava-shapes [--threads 1]

Two threads is the default; on a machine whose cores are busy with other work, one thread is
much faster, because torch's threads wait on each other whenever one of them is descheduled.

`llava-pipeline eval models/tiny-llava-shapes` scores the result through the pipeline itself.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.config import CaptionTask, TagsTask, VqaTask
from pipeline.images import decode_image
from pipeline.modeling import InputBuilder
from pipeline.testing.shards import (
    BACKGROUND_QUESTION,
    COLOR_QUESTION,
    COLORS,
    SHAPE_QUESTION,
    SHAPES,
    Scene,
    add_noise,
    draw_scene,
    encode,
    presence_question,
    random_scene,
)
from pipeline.testing.tiny_llava import LLAVA_CHAT_TEMPLATE, build_tokenizer

CAPTION_PROMPT: str = CaptionTask.model_fields["prompt"].default
TAGS_PROMPT: str = TagsTask.model_fields["prompt"].default
VQA_PROMPT: str = VqaTask.model_fields["prompt"].default
QUESTIONS = [SHAPE_QUESTION, COLOR_QUESTION, BACKGROUND_QUESTION, *(presence_question(s) for s in SHAPES)]

IMAGE_SIZE = 48
PATCH_SIZE = 8
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "models" / "tiny-llava-shapes"


@dataclass(frozen=True)
class TrainSettings:
    seed: int = 0
    image_size: int = IMAGE_SIZE
    patch_size: int = PATCH_SIZE
    pool: int = 8_000
    vision_steps: int = 3000
    vision_batch: int = 64
    vision_lr: float = 1e-3
    steps: int = 700
    batch: int = 48
    lr: float = 1.5e-3
    warmup: int = 40
    threads: int = 2


def tokenizer_corpus() -> list[str]:
    """Every word the model reads or writes, so colours, shapes and prompt words are single tokens."""
    words = " ".join([*COLORS, *SHAPES, "background yes no a on"])
    example = Scene("circle", "red", "blue")
    return [
        f"USER: <image>\n{CAPTION_PROMPT} ASSISTANT: {example.caption}</s>",
        f"USER: <image>\n{TAGS_PROMPT} ASSISTANT: {example.tags_text}</s>",
        *(f"USER: <image>\n{VQA_PROMPT.replace('{question}', q)} ASSISTANT: yes</s>" for q in QUESTIONS),
        words,
        ", ".join(words.split()),
    ]


def build_processor(image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE):
    """LlavaProcessor whose image processor squashes the whole image to a square (no centre crop), so a
    shape near the edge of a wide or tall image is still seen."""
    from transformers import LlavaProcessor

    from pipeline.testing.tiny_llava import _image_processor_class

    image_processor = _image_processor_class("CLIPImageProcessor")(
        size={"height": image_size, "width": image_size},
        do_center_crop=False,
        crop_size={"height": image_size, "width": image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(512, tokenizer_corpus()),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def build_model(tokenizer, image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=96,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=96,
    )
    text = LlamaConfig(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


class ScenePool:
    """Training images, drawn, encoded and decoded the way shards deliver them to the pipeline, then
    preprocessed once. Drawing and encoding cost more than a training step, so a pool is made up
    front and each step samples from it; a horizontal flip (all four shapes are mirror-symmetric)
    varies what a step sees.

    Each image also keeps where its shape is: for every patch the model sees, the fraction of each
    of its CELLS x CELLS sub-squares the shape covers. Learning to predict that gives the vision
    tower a dense signal about outlines, which a tower this small does not find from four shape
    labels alone."""

    FORMATS = ("jpg", "png", "webp")
    CELLS = 4

    def __init__(self, builder: InputBuilder, rng: random.Random, count: int, image_size: int, patch_size: int):
        self.rng = rng
        self.grid = image_size // patch_size
        scenes, pixels, masks = [], [], []
        for _ in range(count):
            scene = random_scene(rng)
            width, height = self._size()
            clean = draw_scene(scene, rng, width, height)
            noise = rng.choice([0.0, rng.uniform(0, 12)])
            image = add_noise(clean, noise, rng) if noise else clean
            data = encode(image, rng.choice(self.FORMATS), quality=rng.randint(35, 95))
            arrays, self.replacement = builder.image_arrays(decode_image(data, max_pixels=1 << 24).image)
            scenes.append(scene)
            pixels.append(arrays["pixel_values"])
            masks.append(self._coverage(clean, scene))
        self.scenes = scenes
        self.pixels = torch.from_numpy(np.stack(pixels))
        self.masks = torch.from_numpy(np.stack(masks))

    def _coverage(self, clean, scene: Scene) -> np.ndarray:
        from PIL import Image

        shape = np.any(np.asarray(clean) != np.array(COLORS[scene.background], dtype=np.uint8), axis=-1)
        side = self.grid * self.CELLS
        # The image processor squashes the whole image to a square; so does this.
        fraction = np.asarray(
            Image.fromarray(shape.astype(np.uint8) * 255).resize((side, side), Image.Resampling.BOX), np.float32
        )
        cells = (fraction / 255).reshape(self.grid, self.CELLS, self.grid, self.CELLS).transpose(0, 2, 1, 3)
        return cells.reshape(self.grid * self.grid, self.CELLS * self.CELLS)

    def _size(self) -> tuple[int, int]:
        short = self.rng.randint(36, 128)
        long = min(192, int(short * self.rng.uniform(1.0, 2.0)))
        return (short, long) if self.rng.random() < 0.5 else (long, short)

    def sample(self, count: int) -> tuple[list[Scene], torch.Tensor, torch.Tensor]:
        """Scenes, pixel values and shape coverage (batch, patches, cells) of `count` random pool images."""
        indices = [self.rng.randrange(len(self.scenes)) for _ in range(count)]
        pixels, masks = self.pixels[indices], self.masks[indices]
        flip = torch.tensor([self.rng.random() < 0.5 for _ in indices])
        pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
        grid, cells = self.grid, self.CELLS
        flipped = masks.view(count, grid, grid, cells, cells).flip(2, 4).reshape(masks.shape)
        masks = torch.where(flip[:, None, None], flipped, masks)
        return [self.scenes[i] for i in indices], pixels, masks


def targets(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """(instruction, answer) pairs for one image: caption, tags and one of each kind of question,
    with "Is there a <shape>?" asked about its own shape or another one equally often."""
    asked = scene.shape if rng.random() < 0.5 else rng.choice([s for s in SHAPES if s != scene.shape])
    pairs = [(CAPTION_PROMPT, scene.caption), (TAGS_PROMPT, scene.tags_text)]
    for question in (SHAPE_QUESTION, COLOR_QUESTION, BACKGROUND_QUESTION, presence_question(asked)):
        pairs.append((VQA_PROMPT.replace("{question}", question), scene.answer(question)))
    return pairs


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * progress)))


def train_vision(model, pool: ScenePool, settings: TrainSettings, log) -> None:
    """Teach the vision tower shape, colour and background through throwaway heads on its patch
    features (the layer LLaVA feeds the projector), and where the shape's outline runs (see
    `ScenePool`). Each attribute pools the patches with a few learned attention queries of its own
    (the shape is in a few patches, the background in most), then a small MLP classifies."""
    tower = model.model.vision_tower
    hidden = tower.config.hidden_size
    per_attribute = 4
    labels = {"shape": list(SHAPES), "color": sorted(COLORS), "background": sorted(COLORS)}
    queries = torch.nn.Parameter(torch.randn(len(labels) * per_attribute, hidden) * 0.02)
    coverage = torch.nn.Linear(hidden, ScenePool.CELLS**2)
    heads = torch.nn.ModuleDict(
        {
            name: torch.nn.Sequential(
                torch.nn.Linear(per_attribute * hidden, 128), torch.nn.GELU(), torch.nn.Linear(128, len(classes))
            )
            for name, classes in labels.items()
        }
    )
    parameters = [*tower.parameters(), *heads.parameters(), *coverage.parameters(), queries]
    optimizer = torch.optim.AdamW(parameters, lr=settings.vision_lr)
    for step in range(settings.vision_steps):
        scenes, pixels, masks = pool.sample(settings.vision_batch)
        patches = tower(pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
        weights = torch.softmax(patches @ queries.T / hidden**0.5, dim=1)  # (batch, patches, queries)
        pooled = torch.einsum("bpq,bph->bqh", weights, patches).reshape(len(scenes), len(labels), -1)
        losses = {
            name: torch.nn.functional.cross_entropy(
                heads[name](pooled[:, index]),
                torch.tensor([classes.index(getattr(scene, name)) for scene in scenes]),
            )
            for index, (name, classes) in enumerate(labels.items())
        }
        losses["outline"] = torch.nn.functional.binary_cross_entropy_with_logits(coverage(patches), masks)
        loss = sum(losses.values())
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, settings.vision_steps, settings.vision_lr, settings.warmup)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == settings.vision_steps - 1:
            log(f"vision step {step:4d}  " + "  ".join(f"{name} {value.item():.3f}" for name, value in losses.items()))


def _batch(builder: InputBuilder, replacement: str, examples: list[tuple[str, str]], pixel_values: torch.Tensor):
    """Right-padded input ids with labels on the answer tokens (and the closing </s>) only."""
    tokenizer = builder.tokenizer
    sequences, labels = [], []
    for instruction, answer in examples:
        prompt = builder.token_ids([builder.render(instruction)], replacement)[0]
        # The template writes an assistant turn as "ASSISTANT: {text}</s>"; generation continues from "ASSISTANT:".
        reply = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        sequences.append(prompt + reply)
        labels.append([-100] * len(prompt) + reply)
    longest = max(len(s) for s in sequences)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([s + [pad] * (longest - len(s)) for s in sequences]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (longest - len(s)) for s in sequences]),
        "labels": torch.tensor([lab + [-100] * (longest - len(lab)) for lab in labels]),
        "pixel_values": pixel_values,
    }


def train_llava(model, pool: ScenePool, builder: InputBuilder, settings: TrainSettings, log, snapshot=None) -> None:
    rng = pool.rng
    # The tower keeps what the first phase taught it: at this learning rate, training it along with
    # the decoder wiped out its shape features (shape answers fell back to chance).
    model.model.vision_tower.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=0.01)
    # Each image serves two of its targets per step, so the step sees more targets per image drawn.
    per_image = 2
    for step in range(settings.steps):
        scenes, pixels, _ = pool.sample(settings.batch // per_image)
        examples = [pair for scene in scenes for pair in rng.sample(targets(scene, rng), per_image)]
        batch = _batch(builder, pool.replacement, examples, pixels.repeat_interleave(per_image, dim=0))
        loss = model(**batch).loss
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, settings.steps, settings.lr, settings.warmup)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        if step % 50 == 0 or step == settings.steps - 1:
            log(f"llava step {step:4d}  loss {loss.item():.4f}")
        if snapshot is not None and step and step % 300 == 0:
            snapshot(step)


def train(out: str | Path, settings: TrainSettings = TrainSettings(), *, snapshots: bool = False) -> Path:
    started = time.perf_counter()
    load_before = os.getloadavg()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", flush=True)

    torch.set_num_threads(settings.threads)
    random.seed(settings.seed)
    np.random.seed(settings.seed)
    torch.manual_seed(settings.seed)

    processor = build_processor(settings.image_size, settings.patch_size)
    builder = InputBuilder(processor)
    model = build_model(processor.tokenizer, settings.image_size, settings.patch_size)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    pool = ScenePool(builder, random.Random(settings.seed), settings.pool, settings.image_size, settings.patch_size)
    log(f"{settings.pool} training images drawn")
    model.train()
    train_vision(model, pool, settings, log)
    out = Path(out)

    def snapshot(step: int) -> None:
        """A copy of the model mid-training, for judging how many steps are needed."""
        model.save_pretrained(out.with_name(f"{out.name}-step{step}"))
        processor.save_pretrained(out.with_name(f"{out.name}-step{step}"))

    train_llava(model, pool, builder, settings, log, snapshot if snapshots else None)
    model.eval()

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    elapsed = time.perf_counter() - started
    # Wall time depends on what else the machine runs; the load averages say how busy it was.
    record = {
        "settings": settings.__dict__,
        "wall_seconds": round(elapsed, 1),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"saved {out} after {elapsed / 60:.1f} min (load average {record['load_average_after'][0]})")
    return out


def main(argv: list[str] | None = None) -> int:
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"model directory (default {DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--vision-steps", type=int, default=defaults.vision_steps)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="LLaVA training steps")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads")
    parser.add_argument("--snapshots", action="store_true", help="also save OUT-stepN every 300 LLaVA steps")
    args = parser.parse_args(argv)
    settings = TrainSettings(seed=args.seed, vision_steps=args.vision_steps, steps=args.steps, threads=args.threads)
    train(args.out, settings, snapshots=args.snapshots)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
