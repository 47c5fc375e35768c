"""Train a tiny LLaVA that sees: coloured shapes on coloured backgrounds, so its outputs can be checked.

The model is built from the real transformers classes (CLIP vision tower, LLaVA projector, Llama
decoder, LlavaProcessor with a tokenizer trained locally and the pipeline's chat template) and
trained on images from `pipeline.testing.shards`: one shape (circle, square, triangle, star) in one
of eight colours, at a random position and size, on a background of another colour, with pixel
noise, mixed sizes and aspect ratios, and JPEG/PNG/WebP at varying quality.

Targets use the pipeline's own prompts (the task defaults in `pipeline.config`), rendered and
tokenized by `pipeline.inputs.InputBuilder` exactly as the prepare stage does at inference:

  caption  "a red circle on a blue background"
  tags     "red, circle, blue background"
  vqa      "What shape is in the image?" -> "circle", "What colour is the shape?" -> "red",
           "What colour is the background?" -> "blue", "Is there a star?" -> "yes" / "no"

Training has three stages: the vision tower first learns the three attributes and the shape's
outline through throwaway heads (cheap: no decoder); then the whole LLaVA, the tower frozen, learns
every answer, with the loss on the answer tokens only; then a stage of presence questions, with
throwaway probes on the decoder (see `train_llava` for why that question needs them). Everything
is seeded, and the training images are drawn from per-image seeds, so a run with the same settings
and thread count on the same machine gives the same weights (`training.json` in the model directory
records the settings, the wall time and the load average):

    python -m pipeline.tools.train_shapes --out models/tiny-llava-shapes [--threads 1]

Two threads is the default; on a machine whose cores are busy with other work, one thread is
much faster, because torch's threads wait on each other whenever one of them is descheduled.

`llava-pipeline eval models/tiny-llava-shapes` scores the result through the pipeline itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.config import CaptionTask, TagsTask, VqaTask
from pipeline.images import decode_image
from pipeline.inputs import InputBuilder
from pipeline.testing.shards import (
    BACKGROUND_QUESTION,
    COLOR_QUESTION,
    COLORS,
    PRESENCE_QUESTIONS,
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
from pipeline.tools.machine import cpu_model

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
    pool: int = 24_000
    held_out: int = 1_000  # images the vision phase reports its accuracy on
    workers: int = 2  # processes drawing the pool
    vision_steps: int = 3500
    vision_batch: int = 64
    vision_lr: float = 1e-3
    steps: int = 600  # every task
    presence_steps: int = 350  # then presence questions with probes (see train_llava)
    presence_lr: float = 1.5e-3
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


_drawer: InputBuilder | None = None


def _init_drawer(processor) -> None:
    global _drawer
    _drawer = InputBuilder(processor)


def _draw_range(job: tuple[str, int, int]) -> tuple[list[Scene], np.ndarray, np.ndarray]:
    seed, start, stop = job
    drawn = [draw_training_image(_drawer, random.Random(f"{seed}-{index}")) for index in range(start, stop)]
    return [d[0] for d in drawn], np.stack([d[1] for d in drawn]), np.stack([d[2] for d in drawn])


def draw_training_image(builder: InputBuilder, rng: random.Random) -> tuple[Scene, np.ndarray, np.ndarray]:
    """One scene as a shard delivers it (random size and aspect, noise, JPEG/PNG/WebP at varying
    quality), preprocessed for the model, with its shape coverage (see `ScenePool`)."""
    scene = random_scene(rng)
    short = rng.randint(36, 128)
    long = min(192, int(short * rng.uniform(1.0, 2.0)))
    width, height = (short, long) if rng.random() < 0.5 else (long, short)
    clean = draw_scene(scene, rng, width, height)
    noise = rng.choice([0.0, rng.uniform(0, 12)])
    image = add_noise(clean, noise, rng) if noise else clean
    data = encode(image, rng.choice(ScenePool.FORMATS), quality=rng.randint(35, 95))
    arrays, _ = builder.image_arrays(decode_image(data, max_pixels=1 << 24).image)
    grid = builder.processor.image_processor.size["height"] // builder.processor.patch_size
    return scene, arrays["pixel_values"], shape_coverage(clean, scene, grid, ScenePool.CELLS)


def shape_coverage(clean, scene: Scene, grid: int, cells: int) -> np.ndarray:
    """For each of the grid x grid patches the tower sees, the fraction of each of its cells x cells
    sub-squares that the shape covers."""
    from PIL import Image

    shape = np.any(np.asarray(clean) != np.array(COLORS[scene.background], dtype=np.uint8), axis=-1)
    side = grid * cells
    # The image processor squashes the whole image to a square; so does this.
    fraction = np.asarray(
        Image.fromarray(shape.astype(np.uint8) * 255).resize((side, side), Image.Resampling.BOX), np.float32
    )
    per_cell = (fraction / 255).reshape(grid, cells, grid, cells).transpose(0, 2, 1, 3)
    return per_cell.reshape(grid * grid, cells * cells)


def draw_parts(jobs: list, draw, initializer, initarg, workers: int) -> list:
    """`draw` over `jobs`, in order: in `workers` spawned processes, each set up by `initializer(initarg)`, or here
    when `workers` is 1. Every image has its own seed, so the result is the same either way."""
    if workers <= 1:
        initializer(initarg)
        return [draw(job) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the parent already runs torch threads
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, context, initializer=initializer, initargs=(initarg,)) as pool:
        return list(pool.map(draw, jobs))


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
    CHUNK = 500  # images per task handed to a drawing process

    def __init__(self, builder: InputBuilder, rng: random.Random, count: int, seed: str, workers: int = 1):
        """`count` images, image i drawn from its own generator seeded with f"{seed}-{i}", so the pool is
        the same however many `workers` processes draw it."""
        self.rng = rng
        self.grid = builder.processor.image_processor.size["height"] // builder.processor.patch_size
        _, self.replacement = builder.image_arrays(draw_scene(Scene("circle", "red", "blue"), random.Random(0)))
        jobs = [(seed, start, min(count, start + self.CHUNK)) for start in range(0, count, self.CHUNK)]
        self.fill(draw_parts(jobs, _draw_range, _init_drawer, builder.processor, workers))

    def fill(self, parts: list[tuple[list[Scene], np.ndarray, np.ndarray]]) -> None:
        """The pool from drawn parts, each (scenes, pixel values, shape coverage), in order."""
        self.scenes = [scene for part in parts for scene in part[0]]
        self.pixels = torch.from_numpy(np.concatenate([part[1] for part in parts]))
        self.masks = torch.from_numpy(np.concatenate([part[2] for part in parts]))

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


def step_examples(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """What one image teaches in one step: the caption or the tags, one of the three attribute
    questions, and an "Is there a <shape>?" question. Comparing the asked shape with the seen one is
    the hardest of the answers, so it gets a third of the examples."""
    pairs = targets(scene, rng)
    return [rng.choice(pairs[:2]), rng.choice(pairs[2:5]), pairs[5]]


def presence_examples(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """The presence stage: the image is asked about its own shape ("yes") and about another one ("no"),
    so the same picture gets both answers and only comparing the asked shape with the seen one tells
    them apart; and one other target, so nothing is forgotten."""
    other = rng.choice([shape for shape in SHAPES if shape != scene.shape])
    asked = [presence_question(scene.shape), presence_question(other)]
    return [
        *((VQA_PROMPT.replace("{question}", q), scene.answer(q)) for q in asked),
        rng.choice(targets(scene, rng)[:5]),
    ]


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


def train_vision(model, pool: ScenePool, held_out: ScenePool, settings: TrainSettings, log) -> None:
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

    def forward(pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        patches = tower(pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
        weights = torch.softmax(patches @ queries.T / hidden**0.5, dim=1)  # (batch, patches, queries)
        pooled = torch.einsum("bpq,bph->bqh", weights, patches).reshape(len(pixels), len(labels), -1)
        return patches, {name: heads[name](pooled[:, index]) for index, name in enumerate(labels)}

    def truth(scenes: list[Scene], name: str) -> torch.Tensor:
        return torch.tensor([labels[name].index(getattr(scene, name)) for scene in scenes])

    def held_out_accuracy() -> str:
        with torch.no_grad():
            _, logits = forward(held_out.pixels)
        hits = {name: (logits[name].argmax(-1) == truth(held_out.scenes, name)).float().mean() for name in labels}
        return "  ".join(f"{name} {value.item():.3f}" for name, value in hits.items())

    for step in range(settings.vision_steps):
        scenes, pixels, masks = pool.sample(settings.vision_batch)
        patches, logits = forward(pixels)
        losses = {name: torch.nn.functional.cross_entropy(logits[name], truth(scenes, name)) for name in labels}
        losses["outline"] = torch.nn.functional.binary_cross_entropy_with_logits(coverage(patches), masks)
        loss = sum(losses.values())
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, settings.vision_steps, settings.vision_lr, settings.warmup)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == settings.vision_steps - 1:
            log(f"vision step {step:4d}  " + "  ".join(f"{name} {value.item():.3f}" for name, value in losses.items()))
        if step % 500 == 0 or step == settings.vision_steps - 1:
            log(f"vision step {step:4d}  held-out accuracy  {held_out_accuracy()}")


def _batch(builder: InputBuilder, replacement: str, examples: list[tuple[str, str]], pixel_values: torch.Tensor):
    """Right-padded input ids with labels on the answer tokens (and the closing </s>) only."""
    tokenizer = builder.tokenizer
    sequences, labels = [], []
    for instruction, answer in examples:
        prompt = builder.prompt_ids([instruction], replacement)[0]
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
    """The whole LLaVA on the answers, the tower frozen: first every task, then the presence question with probes.

    "Is there a <shape>?" is yes exactly when the asked shape and the seen shape match, so neither one alone
    says anything about the answer, and gradient descent finds no first step towards it: trained on the
    answers alone, the decoder stayed at chance (p(yes) = 0.54 for every question and image) long after every
    other task was learned. So a second stage asks every image about its own shape and about another one,
    and two throwaway linear probes on the decoder's state where the answer is generated, one for the seen
    shape and one for the asked shape, give that state both halves of the comparison. Probing from the first
    step instead starved the other tasks: the colours were never learned. With one presence question per
    image instead of the pair, the stage depended on the random state: it stuck at 81-83% on absent shapes
    in three of nine tries (two whole runs, and one of seven runs of this stage from saved weights); with
    the pair, that one reached 98% from the same weights and seed.
    """
    # The tower keeps what the first phase taught it: at this learning rate, training it along with
    # the decoder wiped out its shape features (shape answers fell back to chance).
    model.model.vision_tower.requires_grad_(False)
    weights = [p for p in model.parameters() if p.requires_grad]
    hidden = model.config.text_config.hidden_size
    probe_layer = model.config.text_config.num_hidden_layers - 1
    probes = torch.nn.ModuleDict(
        {"seen": torch.nn.Linear(hidden, len(SHAPES)), "asked": torch.nn.Linear(hidden, len(SHAPES))}
    )
    # (name, steps, peak learning rate, what it trains, examples per image, rows per image, probed)
    stages = [
        ("llava", settings.steps, settings.lr, weights, step_examples, 3, False),
        (
            "presence",
            settings.presence_steps,
            settings.presence_lr,
            weights + list(probes.parameters()),
            presence_examples,
            3,
            True,
        ),
    ]
    done = 0
    for name, steps, lr, trainable, examples_of, rows_per_image, probed in stages:
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01)
        for step in range(steps):
            scenes, pixels, _ = pool.sample(settings.batch // rows_per_image)
            examples = [pair for scene in scenes for pair in examples_of(scene, pool.rng)]
            assert len(examples) == len(scenes) * rows_per_image, name
            batch = _batch(builder, pool.replacement, examples, pixels.repeat_interleave(rows_per_image, dim=0))
            output = model(**batch, output_hidden_states=probed)
            loss = output.loss
            if probed:
                rows = [row for row, (question, _) in enumerate(examples) if question in PRESENCE_QUESTIONS]
                # the last prompt token: the position whose output is the first answer token
                answer_at = (batch["labels"][rows] != -100).int().argmax(-1) - 1
                state = output.hidden_states[probe_layer][rows, answer_at]
                seen = torch.tensor([SHAPES.index(scenes[row // rows_per_image].shape) for row in rows])
                asked = torch.tensor([SHAPES.index(PRESENCE_QUESTIONS[examples[row][0]]) for row in rows])
                probe_loss = torch.nn.functional.cross_entropy(probes["seen"](state), seen)
                loss = loss + 0.5 * (probe_loss + torch.nn.functional.cross_entropy(probes["asked"](state), asked))
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, steps, lr, settings.warmup)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            if step % 50 == 0 or step == steps - 1:
                log(f"{name} step {step:4d}  loss {output.loss.item():.4f}")
            done += 1
            if snapshot is not None and done % 300 == 0:
                snapshot(done)


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def training_record(out: Path, settings: dict[str, object], elapsed: float, load_before) -> dict[str, object]:
    """How a saved checkpoint was made, for its training.json: settings, weights hash, machine and cost."""
    # Wall time depends on what else the machine runs; the load averages say how busy it was.
    return {
        "settings": settings,
        # the same settings and thread count on the same machine give the same file
        "weights_sha256": hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest(),
        # another CPU model runs other float kernels, so its weights (and hash) differ slightly
        "cpu_model": cpu_model(),
        "torch": torch.__version__,
        "wall_seconds": round(elapsed, 1),
        # CPU time of this process and its drawing processes: what the run costs on cores of its own,
        # whatever else the machine ran
        "cpu_seconds": round(sum(_cpu_seconds(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)), 1),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def _cpu_steal() -> tuple[int, int] | None:
    """(steal, total) CPU ticks from /proc/stat, where there is one."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (ticks[7], sum(ticks)) if len(ticks) > 7 else None


def train(out: str | Path, settings: TrainSettings = TrainSettings(), *, snapshots: bool = False) -> Path:
    started = time.perf_counter()
    load_before = os.getloadavg()
    steal_before = _cpu_steal()

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
    pool = ScenePool(builder, random.Random(settings.seed), settings.pool, f"train-{settings.seed}", settings.workers)
    held_out = ScenePool(
        builder, random.Random(settings.seed), settings.held_out, f"held-out-{settings.seed}", settings.workers
    )
    log(f"{settings.pool} training and {settings.held_out} held-out images drawn")
    model.train()
    train_vision(model, pool, held_out, settings, log)
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
    record = training_record(out, settings.__dict__, elapsed, load_before)
    steal_after = _cpu_steal()
    if steal_before and steal_after:
        # On a virtual machine, the share of CPU time the host gave to others: it stretches wall time.
        record["cpu_steal_fraction"] = round(
            (steal_after[0] - steal_before[0]) / max(1, steal_after[1] - steal_before[1]), 3
        )
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    log(
        f"saved {out} after {elapsed / 60:.1f} min, {record['cpu_seconds'] / 60:.1f} CPU-min"
        f" (load average {record['load_average_after'][0]}, steal {record.get('cpu_steal_fraction', 'n/a')})"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"model directory (default {DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--vision-steps", type=int, default=defaults.vision_steps)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="LLaVA training steps on every task")
    parser.add_argument(
        "--presence-steps", type=int, default=defaults.presence_steps, help="then steps on the presence question"
    )
    parser.add_argument("--pool", type=int, default=defaults.pool, help="training images drawn up front")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="processes drawing the images")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads")
    parser.add_argument("--snapshots", action="store_true", help="also save OUT-stepN every 300 LLaVA steps")
    args = parser.parse_args(argv)
    settings = TrainSettings(
        seed=args.seed,
        pool=args.pool,
        workers=args.workers,
        vision_steps=args.vision_steps,
        steps=args.steps,
        presence_steps=args.presence_steps,
        threads=args.threads,
    )
    train(args.out, settings, snapshots=args.snapshots)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
