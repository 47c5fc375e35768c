"""Synthetic WebDataset shards: a coloured shape on a coloured background per sample.

Each sample's JSON carries its ground truth (shape, colours, a reference caption), so a model that
has learned the scenes can be scored, and a pipeline that mixes rows up can be caught.
"""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}

# The questions the shapes model (pipeline.tools.train_shapes) was trained to answer.
SHAPE_QUESTION = "What shape is in the image?"
COLOR_QUESTION = "What colour is the shape?"
BACKGROUND_QUESTION = "What colour is the background?"


def presence_question(shape: str) -> str:
    return f"Is there a {shape}?"


PRESENCE_QUESTIONS = {presence_question(shape): shape for shape in SHAPES}


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} on a {self.background} background"

    @property
    def tags(self) -> list[str]:
        return [self.color, self.shape, f"{self.background} background"]

    @property
    def tags_text(self) -> str:
        return ", ".join(self.tags)

    def answer(self, question: str) -> str | None:
        """The true answer to one of the trained questions; None for any other question."""
        if question == SHAPE_QUESTION:
            return self.shape
        if question == COLOR_QUESTION:
            return self.color
        if question == BACKGROUND_QUESTION:
            return self.background
        if question in PRESENCE_QUESTIONS:
            return "yes" if PRESENCE_QUESTIONS[question] == self.shape else "no"
        return None

    @classmethod
    def from_truth(cls, truth: dict[str, object]) -> "Scene":
        return cls(shape=str(truth["shape"]), color=str(truth["color"]), background=str(truth["background"]))


def random_scene(rng: random.Random) -> Scene:
    color, background = rng.sample(sorted(COLORS), 2)
    return Scene(shape=rng.choice(SHAPES), color=color, background=background)


def draw_scene(scene: Scene, rng: random.Random, width: int = 64, height: int = 64, noise: float = 0.0) -> Image.Image:
    """The scene's shape at a random position and size (40-85% of the short side), plus Gaussian
    pixel noise of standard deviation `noise` (seeded from `rng`)."""
    image = Image.new("RGB", (width, height), COLORS[scene.background])
    draw = ImageDraw.Draw(image)
    short = min(width, height)
    # Shapes stay large enough that a star and a circle differ after the model's 48 px resize.
    side = rng.randint(max(8, int(short * 0.4)), max(9, int(short * 0.85)))
    x0 = rng.randint(0, width - side)
    y0 = rng.randint(0, height - side)
    box = (x0, y0, x0 + side, y0 + side)
    fill = COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
        draw.rectangle(box, fill=fill)
    elif scene.shape == "triangle":
        draw.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=fill)
    else:
        _star(draw, x0 + side / 2, y0 + side / 2, side / 2, fill)
    return add_noise(image, noise, rng) if noise > 0 else image


def add_noise(image: Image.Image, noise: float, rng: random.Random) -> Image.Image:
    """Gaussian pixel noise of standard deviation `noise`, seeded from `rng`."""
    pixels = np.asarray(image, dtype=np.float32)
    pixels += np.random.default_rng(rng.getrandbits(32)).normal(0.0, noise, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _star(draw: ImageDraw.ImageDraw, cx: float, cy: float, radius: float, fill: tuple[int, int, int]) -> None:
    points = []
    for i in range(10):
        r = radius if i % 2 == 0 else radius * 0.45
        angle = math.pi / 2 + i * math.pi / 5
        points.append((cx + r * math.cos(angle), cy - r * math.sin(angle)))
    draw.polygon(points, fill=fill)


def encode(image: Image.Image, extension: str, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    fmt = FORMATS[extension]
    image.save(buffer, format=fmt, **({"quality": quality} if fmt in ("JPEG", "WEBP") else {}))
    return buffer.getvalue()


QuestionSource = Union[list[str], Callable[[Scene, random.Random], list[str]]]


def shape_presence_questions(scene: Scene, rng: random.Random) -> list[str]:
    """Per-sample questions that differ between samples: one "Is there a <shape>?" whose answer is
    yes and one whose answer is no, in random order."""
    other = rng.choice([shape for shape in SHAPES if shape != scene.shape])
    questions = [presence_question(scene.shape), presence_question(other)]
    rng.shuffle(questions)
    return questions


def synthetic_samples(
    count: int,
    *,
    seed: int = 0,
    key_prefix: str = "sample",
    extensions: Iterable[str] = ("jpg",),
    sizes: Iterable[tuple[int, int]] = ((64, 64),),
    questions: QuestionSource | None = None,
    noise: float = 4.0,
    quality: tuple[int, int] = (70, 95),
    scenes: Sequence[Scene] | None = None,
) -> list[dict[str, object]]:
    """WebDataset sample dicts (`__key__`, image member, `json`) with ground truth in the JSON.

    `questions` go into each sample's JSON under "questions": the same list for every sample, or a
    function of the sample's scene (e.g. `shape_presence_questions`). JPEG and WebP quality is drawn
    from the `quality` range per sample. `scenes`: what to draw, one sample each (`count` is then ignored);
    by default `count` random scenes.
    """
    rng = random.Random(seed)
    extensions = list(extensions)
    sizes = list(sizes)
    samples = []
    for i in range(count if scenes is None else len(scenes)):
        scene = random_scene(rng) if scenes is None else scenes[i]
        width, height = sizes[i % len(sizes)]
        extension = extensions[i % len(extensions)]
        truth: dict[str, object] = {
            "shape": scene.shape,
            "color": scene.color,
            "background": scene.background,
            "caption": scene.caption,
        }
        if questions is not None:
            truth["questions"] = questions(scene, rng) if callable(questions) else list(questions)
        image = draw_scene(scene, rng, width, height, noise=noise)
        samples.append(
            {
                "__key__": f"{key_prefix}-{i:06d}",
                extension: encode(image, extension, quality=rng.randint(*quality)),
                "json": json.dumps(truth).encode(),
            }
        )
    return samples


def write_shard(target: str | Path | BinaryIO, samples: Iterable[dict[str, object]]) -> None:
    """Write samples as a WebDataset tar: members `<key>.<ext>` in sample order."""
    from webdataset import TarWriter

    def as_bytes(value: object) -> bytes:
        return value.encode() if isinstance(value, str) else value  # type: ignore[return-value]

    stream = open(target, "wb") if isinstance(target, (str, Path)) else target
    try:
        with TarWriter(stream, encoder=False) as writer:
            for sample in samples:
                writer.write({k: (v if k.startswith("__") else as_bytes(v)) for k, v in sample.items()})
    finally:
        if isinstance(target, (str, Path)):
            stream.close()


def write_shards(
    directory: str | Path,
    *,
    shards: int,
    samples_per_shard: int,
    seed: int = 0,
    name: str = "shard-{:05d}.tar",
    **sample_options: object,
) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(shards):
        path = directory / name.format(index)
        samples = synthetic_samples(
            samples_per_shard,
            seed=seed * 100_003 + index,
            key_prefix=f"s{index:05d}",
            **sample_options,  # type: ignore[arg-type]
        )
        write_shard(path, samples)
        paths.append(path)
    return paths
