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
from typing import BinaryIO, Iterable

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


def random_scene(rng: random.Random) -> Scene:
    color, background = rng.sample(sorted(COLORS), 2)
    return Scene(shape=rng.choice(SHAPES), color=color, background=background)


def draw_scene(scene: Scene, rng: random.Random, width: int = 64, height: int = 64) -> Image.Image:
    image = Image.new("RGB", (width, height), COLORS[scene.background])
    draw = ImageDraw.Draw(image)
    side = rng.randint(max(8, min(width, height) // 3), max(9, int(min(width, height) * 0.8)))
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
    return image


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


def synthetic_samples(
    count: int,
    *,
    seed: int = 0,
    key_prefix: str = "sample",
    extensions: Iterable[str] = ("jpg",),
    sizes: Iterable[tuple[int, int]] = ((64, 64),),
    questions: list[str] | None = None,
) -> list[dict[str, object]]:
    """WebDataset sample dicts (`__key__`, image member, `json`) with ground truth in the JSON."""
    rng = random.Random(seed)
    extensions = list(extensions)
    sizes = list(sizes)
    samples = []
    for i in range(count):
        scene = random_scene(rng)
        width, height = sizes[i % len(sizes)]
        extension = extensions[i % len(extensions)]
        truth = {"shape": scene.shape, "color": scene.color, "background": scene.background, "caption": scene.caption}
        if questions is not None:
            truth["questions"] = questions
        samples.append(
            {
                "__key__": f"{key_prefix}-{i:06d}",
                extension: encode(draw_scene(scene, rng, width, height), extension),
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
