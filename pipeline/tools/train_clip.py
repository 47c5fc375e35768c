"""Train a tiny CLIP on the generated shapes, so image search and `clip_score` can be checked against truth.

The model is the real transformers `CLIPModel` with a `CLIPProcessor` (a tokenizer trained locally;
`pipeline.testing.tiny_clip` owns both), trained contrastively on images from
`pipeline.testing.shards` and their captions ("a red circle on a blue background"): one shape in one
of eight colours on a background of another, with pixel noise, mixed sizes and aspect ratios, and
JPEG/PNG/WebP at varying quality, decoded by `pipeline.images.decode_image` as the pipeline does.

What makes a model this small learn it in minutes on two cores:
- the image tower starts from the shapes LLaVA's (`models/tiny-llava-shapes`, trained by
  `pipeline.tools.train_shapes`), which already tells the shapes apart; the text tower, the
  projections and the temperature start from random weights (see `load_vision_tower`);
- every step scores each image against all 224 captions (4 shapes x 8 colours x 7 backgrounds), so
  the captions that share two of three words with its own are always among its negatives;
- text -> image is scored within the batch with every image of the caption counted as a match
  (many images share a caption), which ranks matching images above near misses across images;
- the temperature is CLIP's own learnable `logit_scale`;
- throwaway heads on the image tower (shape, colour, background, and where the shape's outline runs,
  as in `pipeline.tools.train_shapes`) give it a direct signal, and every patch the shape covers
  names the shape, so the patches learn to look at each other; the heads are not saved.

Everything is seeded and each image is drawn from its own seed, so a run with the same settings and
thread count on the same machine gives the same weights. After training, the saved directory is
loaded through `pipeline.embedders.ImageTextEmbedder` (the path production takes) and scored on
held-out images (`pipeline.tools.retrieval`); `training.json` records the settings, the scores, the
wall time and the load average:

    python -m pipeline.tools.train_clip --out models/tiny-clip-shapes
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.images import decode_image
from pipeline.testing.shards import COLORS, SHAPES, Scene, add_noise, draw_scene, encode, random_scene
from pipeline.testing.tiny_clip import build_clip_tokenizer, build_tiny_clip, clip_processor, tiny_clip_model
from pipeline.tools import train_shapes as shapes
from pipeline.tools.train_shapes import shape_coverage

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "models" / "tiny-clip-shapes"
# Far from the training seeds, as `pipeline.tools.evaluate`'s are.
HELD_OUT_SEED = 7_100_000
FORMATS = ("jpg", "png", "webp")
ALL_SCENES = tuple(
    Scene(shape, color, background)
    for shape in SHAPES
    for color in COLORS
    for background in COLORS
    if color != background
)
LABELS = {"shape": list(SHAPES), "color": sorted(COLORS), "background": sorted(COLORS)}


@dataclass(frozen=True)
class TrainSettings:
    seed: int = 0
    # The image tower starts from the one `pipeline.tools.train_shapes` trained (see `load_vision_tower`),
    # so it has that tower's shape: 48 px squashed, 8 px patches, 3 layers of 96.
    vision_from: str = "models/tiny-llava-shapes"
    image_size: int = 48
    patch_size: int = 8
    vision_hidden: int = 96
    vision_layers: int = 3
    vision_intermediate: int = 384
    text_hidden: int = 64
    text_layers: int = 2
    projection_dim: int = 64
    attention_heads: int = 4
    pool: int = 12_000
    workers: int = 2  # processes drawing the pool
    steps: int = 900
    batch: int = 64
    lr: float = 2e-3
    vision_lr: float = 5e-4  # the image tower, already trained, moves more slowly than the new parts
    warmup: int = 50
    aux_weight: float = 1.0  # the throwaway heads' share of the loss
    # On a machine whose cores are busy with other work, one thread is much faster: two ran at 2.6 s a
    # step where one ran at 0.4 s, under the same load (torch's threads wait on each other).
    threads: int = 1
    held_out_combos: int = 56  # held-out scenes with held_out_per_combo images each
    held_out_per_combo: int = 12
    held_out_others: int = 100  # plus random scenes


def tokenizer_corpus() -> list[str]:
    """Every caption, so each colour and shape word is one token."""
    return [scene.caption for scene in ALL_SCENES] + [" ".join([*COLORS, *SHAPES, "a on background"])]


def build_processor(image_size: int):
    return clip_processor(build_clip_tokenizer(512, tokenizer_corpus()), image_size, squash=True)


def draw_image(scene: Scene, rng: random.Random):
    """One scene as a shard delivers it (random size and aspect, noise, JPEG/PNG/WebP at varying
    quality), decoded as the pipeline decodes it; and the clean drawing, for the outline targets."""
    short = rng.randint(36, 112)
    long = min(160, int(short * rng.uniform(1.0, 2.0)))
    width, height = (short, long) if rng.random() < 0.5 else (long, short)
    clean = draw_scene(scene, rng, width, height)
    noise = rng.choice([0.0, rng.uniform(0, 12)])
    image = add_noise(clean, noise, rng) if noise else clean
    data = encode(image, rng.choice(FORMATS), quality=rng.randint(35, 95))
    return decode_image(data, max_pixels=1 << 24).image, clean


_image_processor = None


def _init_drawer(image_processor) -> None:
    global _image_processor
    _image_processor = image_processor


def _draw_range(job: tuple[str, int, int, int, int]) -> tuple[list[Scene], np.ndarray, np.ndarray]:
    seed, start, stop, grid, cells = job
    scenes, images, masks = [], [], []
    for index in range(start, stop):
        rng = random.Random(f"{seed}-{index}")
        scene = random_scene(rng)
        image, clean = draw_image(scene, rng)
        scenes.append(scene)
        images.append(image)
        masks.append(shape_coverage(clean, scene, grid, cells))
    pixels = _image_processor(images=images, return_tensors="np")["pixel_values"].astype(np.float32)
    return scenes, pixels, np.stack(masks)


class ScenePool(shapes.ScenePool):
    """Training images, drawn, encoded, decoded and preprocessed up front (drawing costs more than a
    step); each step samples from the pool, with a horizontal flip (every shape is mirror-symmetric),
    as the shapes LLaVA's pool does."""

    def __init__(self, image_processor, rng: random.Random, count: int, seed: str, grid: int, workers: int = 1):
        """`count` images, image i drawn from its own generator seeded with f"{seed}-{i}", so the pool is
        the same however many `workers` processes draw it."""
        self.rng = rng
        self.grid = grid
        jobs = [
            (seed, start, min(count, start + self.CHUNK), grid, self.CELLS) for start in range(0, count, self.CHUNK)
        ]
        self.fill(shapes.draw_parts(jobs, _draw_range, _init_drawer, image_processor, workers))


def load_vision_tower(model, directory: Path) -> str:
    """Start the image tower from the CLIP vision tower of the shapes LLaVA (`pipeline.tools.train_shapes`),
    which already tells the four shapes apart (98.4% held out): as real CLIPs are trained on from a good
    image tower (LiT), this one then only learns to pool it into the caption space. From random weights,
    a tower this small had learned the shapes only about half the time after 1,500 steps of this
    training. Returns the sha256 of the checkpoint's weights, for the record."""
    from safetensors.torch import load_file

    path = directory / "model.safetensors"
    prefix = "vision_tower."
    weights = {k[len(prefix) :]: v for k, v in load_file(path).items() if k.startswith(prefix)}
    model.vision_model.load_state_dict(weights, strict=True)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.02 + 0.98 * 0.5 * (1 + np.cos(np.pi * progress)))


def train_contrastive(model, pool: ScenePool, tokenizer, settings: TrainSettings, log, snapshot=None) -> None:
    """See the module docstring: image -> all captions, text -> image within the batch, throwaway heads."""
    F = torch.nn.functional
    hidden = model.config.vision_config.hidden_size
    heads = torch.nn.ModuleDict({name: torch.nn.Linear(hidden, len(classes)) for name, classes in LABELS.items()})
    coverage = torch.nn.Linear(hidden, ScenePool.CELLS**2)
    patch_shape = torch.nn.Linear(hidden, len(SHAPES))
    tower = list(model.vision_model.parameters())
    in_tower = {id(p) for p in tower}
    new = [p for p in model.parameters() if id(p) not in in_tower]
    new += [*heads.parameters(), *coverage.parameters(), *patch_shape.parameters()]
    parameters = tower + new
    optimizer = torch.optim.AdamW(
        [{"params": tower, "peak": settings.vision_lr}, {"params": new, "peak": settings.lr}], weight_decay=0.05
    )
    captions = tokenizer([s.caption for s in ALL_SCENES], padding=True, return_tensors="pt")
    index_of = {scene: i for i, scene in enumerate(ALL_SCENES)}

    for step in range(settings.steps):
        scenes, pixels, masks = pool.sample(settings.batch)
        vision = model.vision_model(pixel_values=pixels)
        images = F.normalize(model.visual_projection(vision.pooler_output), dim=-1)
        texts = F.normalize(model.text_projection(model.text_model(**captions).pooler_output), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100.0)
        target = torch.tensor([index_of[s] for s in scenes])
        image_to_text = F.cross_entropy(scale * images @ texts.T, target)
        present = target.unique()
        matches = (present[:, None] == target[None, :]).float()
        text_to_image = (
            -((matches / matches.sum(1, keepdim=True)) * F.log_softmax(scale * texts[present] @ images.T, dim=1))
            .sum(1)
            .mean()
        )
        losses = {"i2t": image_to_text, "t2i": text_to_image}
        for name, classes in LABELS.items():
            truth = torch.tensor([classes.index(getattr(s, name)) for s in scenes])
            losses[name] = settings.aux_weight * F.cross_entropy(heads[name](vision.pooler_output), truth)
        patches = vision.last_hidden_state[:, 1:]
        losses["outline"] = settings.aux_weight * F.binary_cross_entropy_with_logits(coverage(patches), masks)
        # Every patch the shape covers names the shape: a patch cannot tell alone, so this teaches the
        # patches to look at each other, many labels per image instead of one.
        covered = masks.mean(-1) > 0.1  # (batch, patches)
        shape_truth = torch.tensor([SHAPES.index(s.shape) for s in scenes])[:, None].expand_as(covered)
        losses["patch_shape"] = settings.aux_weight * F.cross_entropy(
            patch_shape(patches[covered]), shape_truth[covered]
        )
        loss = sum(losses.values())
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, settings.steps, group["peak"], settings.warmup)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        if step % 50 == 0 or step == settings.steps - 1:
            log(
                f"step {step:4d}  scale {scale.item():5.1f}  "
                + "  ".join(f"{name} {value.item():.3f}" for name, value in losses.items())
            )
        if snapshot is not None and (step + 1) % 250 == 0:
            snapshot(step + 1)


def held_out_set(settings: TrainSettings, seed: int = HELD_OUT_SEED):
    """Held-out scenes (`retrieval.retrieval_scenes`: many captions with enough images to score) and
    their decoded images, each drawn from its own seed far from the training ones."""
    from pipeline.tools.retrieval import retrieval_scenes

    scenes = retrieval_scenes(
        random.Random(seed),
        combos=settings.held_out_combos,
        per_combo=settings.held_out_per_combo,
        others=settings.held_out_others,
    )
    images = [draw_image(scene, random.Random(f"held-out-{seed}-{i}"))[0] for i, scene in enumerate(scenes)]
    return scenes, images


def score(model_dir: Path, scenes: list[Scene], images, *, paraphrase: bool = True) -> dict:
    """Retrieval on held-out images through `ImageTextEmbedder` loading the saved directory, and, with the
    real MiniLM embedding the true captions, how often a paraphrased query finds a matching image."""
    from pipeline.embedders import ImageTextEmbedder, TextEmbedder, packaged_text_model
    from pipeline.tools import retrieval

    embedder = ImageTextEmbedder(model_dir)
    image_vectors = embedder.embed_images(images)
    unique = sorted(set(scenes), key=lambda s: s.caption)
    text_vectors = embedder.embed_texts([s.caption for s in unique])
    caption_vectors = text_vectors[[unique.index(s) for s in scenes]]
    precision = retrieval.precision_at_k(unique, text_vectors, image_vectors, scenes, k=10, min_relevant=10)
    result = {
        "images": len(scenes),
        "captions_scored": len(precision),
        "text_to_image_precision_at_10_min": round(min(precision.values()), 4),
        "text_to_image_precision_at_10_mean": round(float(np.mean(list(precision.values()))), 4),
        "image_to_image_nn_same_shape_and_colour": round(retrieval.nn_same_attributes(image_vectors, scenes), 4),
        "clip_score_auc": round(retrieval.clip_score_auc(image_vectors, caption_vectors, scenes), 4),
    }
    text_model = packaged_text_model() if paraphrase else None
    if text_model is not None:
        minilm = TextEmbedder(text_model)
        queries = [(q, s) for s in unique for q in retrieval.paraphrases(s)]
        result["paraphrase_queries"] = len(queries)
        result["paraphrase_top10_hit_rate_minilm"] = round(
            retrieval.paraphrase_hit_rate(
                minilm.embed([q for q, _ in queries]),
                [s for _, s in queries],
                minilm.embed([s.caption for s in scenes]),
                scenes,
                k=10,
            ),
            4,
        )
    return result


def train(
    out: str | Path, settings: TrainSettings = TrainSettings(), *, evaluate: bool = True, snapshots: bool = False
) -> Path:
    started = time.perf_counter()
    load_before = os.getloadavg()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", flush=True)

    torch.set_num_threads(settings.threads)
    random.seed(settings.seed)
    np.random.seed(settings.seed)
    processor = build_processor(settings.image_size)
    model = tiny_clip_model(
        processor.tokenizer,
        seed=settings.seed,
        image_size=settings.image_size,
        patch_size=settings.patch_size,
        vision_hidden=settings.vision_hidden,
        vision_layers=settings.vision_layers,
        text_hidden=settings.text_hidden,
        text_layers=settings.text_layers,
        projection_dim=settings.projection_dim,
        attention_heads=settings.attention_heads,
        vision_intermediate=settings.vision_intermediate,
    )
    vision_from_sha256 = load_vision_tower(model, REPO / settings.vision_from) if settings.vision_from else None
    log(f"image tower from {settings.vision_from or 'random weights'}")
    torch.manual_seed(settings.seed)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    grid = settings.image_size // settings.patch_size
    pool = ScenePool(
        processor.image_processor,
        random.Random(settings.seed),
        settings.pool,
        f"clip-train-{settings.seed}",
        grid,
        settings.workers,
    )
    log(f"{settings.pool} training images drawn")
    out = Path(out)

    def save(path: Path) -> None:
        build_tiny_clip(path, model=model, tokenizer=processor.tokenizer, image_size=settings.image_size, squash=True)

    def snapshot(step: int) -> None:
        """A copy of the model mid-training, for judging how many steps are needed."""
        save(out.with_name(f"{out.name}-step{step}"))

    model.train()
    train_contrastive(model, pool, processor.tokenizer, settings, log, snapshot if snapshots else None)
    model.eval()
    save(out)
    elapsed = time.perf_counter() - started
    record = {
        **shapes.training_record(out, asdict(settings), elapsed, load_before),
        "vision_from_sha256": vision_from_sha256,
    }
    log(f"saved {out} after {elapsed / 60:.1f} min, {record['cpu_seconds'] / 60:.1f} CPU-min")
    if evaluate:
        scenes, images = held_out_set(settings)
        record["held_out"] = score(out, scenes, images)
        log("held out: " + json.dumps(record["held_out"]))
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"model directory (default {DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--pool", type=int, default=defaults.pool, help="training images drawn up front")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="processes drawing the images")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads")
    parser.add_argument(
        "--vision-lr", type=float, default=defaults.vision_lr, help="peak learning rate of the image tower"
    )
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out retrieval scores")
    parser.add_argument("--snapshots", action="store_true", help="also save OUT-stepN every 250 steps")
    parser.add_argument(
        "--score", type=Path, metavar="DIR", help="only score the model in DIR on the held-out set and print the result"
    )
    args = parser.parse_args(argv)
    if args.score:
        scenes, images = held_out_set(defaults)
        print(json.dumps(score(args.score, scenes, images), indent=2))
        return 0
    settings = TrainSettings(
        seed=args.seed,
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        pool=args.pool,
        workers=args.workers,
        threads=args.threads,
        vision_lr=args.vision_lr,
    )
    train(args.out, settings, evaluate=not args.no_eval, snapshots=args.snapshots)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
