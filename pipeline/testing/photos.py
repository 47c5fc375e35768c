"""Photo-like JPEGs of realistic sizes, made locally: what a capacity benchmark should decode.

The shapes scenes are flat colours that a JPEG codec compresses to almost nothing and decodes in no
time; real photos are not. These images have a photo's structure at every scale (a sky gradient, a
horizon, smooth hills, sharp-edged buildings, foliage-like texture from several octaves of smooth
noise, and a little sensor grain), so their compressed size and decode cost per pixel land where
camera photos do (about 1.5-3 bits per pixel at quality 85-95 with 4:2:0 chroma subsampling).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Sizes people upload, from a phone's downscaled share to a 3-megapixel camera frame.
PHOTO_SIZES: tuple[tuple[int, int], ...] = ((640, 480), (1024, 768), (1600, 1200), (2048, 1536))
QUALITIES: tuple[int, ...] = (85, 90, 95)


def _octave_noise(rng: np.random.Generator, width: int, height: int, cells: int) -> np.ndarray:
    """Smooth noise in [-1, 1]: a `cells`-wide random grid upsampled bicubically to the full size."""
    low_width = max(2, cells)
    low_height = max(2, round(cells * height / width))
    grid = rng.uniform(0, 255, (low_height, low_width)).astype(np.uint8)
    smooth = Image.fromarray(grid, "L").resize((width, height), Image.BICUBIC)
    return np.asarray(smooth, np.float32) / 127.5 - 1.0


def photo(width: int, height: int, seed: int) -> Image.Image:
    """One landscape-like RGB image of `width` x `height`, the same for the same seed."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    horizon = rng.uniform(0.35, 0.65)
    sky_top, sky_bottom = rng.uniform(40, 120, 3), rng.uniform(150, 240, 3)
    ground_near, ground_far = rng.uniform(20, 90, 3), rng.uniform(60, 160, 3)
    t_sky = np.clip(y / horizon, 0, 1)[..., None]
    t_ground = np.clip((y - horizon) / (1 - horizon), 0, 1)[..., None]
    sky = sky_top * (1 - t_sky) + sky_bottom * t_sky
    ground = ground_far * (1 - t_ground) + ground_near * t_ground
    below = (y > horizon)[..., None]
    pixels = np.where(below, ground, sky) * np.ones((1, width, 1), np.float32)

    # Texture on the ground (grass, foliage) and faint clouds in the sky, at several scales.
    texture = sum(_octave_noise(rng, width, height, cells) * amp for cells, amp in ((8, 30), (48, 18), (240, 12)))
    clouds = _octave_noise(rng, width, height, 6) * 25
    pixels += np.where(below, texture[..., None], clouds[..., None] * 0.6)

    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    # Buildings: sharp edges and flat faces with windows, the hard case for a block codec.
    for _ in range(int(rng.integers(3, 8))):
        w = int(rng.uniform(0.04, 0.14) * width)
        h = int(rng.uniform(0.1, 0.35) * height)
        x0 = int(rng.uniform(0, width - w))
        base = int(horizon * height + rng.uniform(0.0, 0.1) * height)
        face = tuple(int(v) for v in rng.uniform(60, 220, 3))
        draw.rectangle([x0, base - h, x0 + w, base], fill=face)
        step = max(4, w // 6)
        for wx in range(x0 + step // 2, x0 + w - step // 2, step):
            for wy in range(base - h + step // 2, base - step // 2, step):
                lit = tuple(int(v) for v in rng.uniform(150, 255, 3))
                draw.rectangle([wx, wy, wx + step // 3, wy + step // 3], fill=lit)
    # A sun or a moon, then a lens's softness.
    r = int(rng.uniform(0.03, 0.07) * width)
    cx, cy = int(rng.uniform(r, width - r)), int(rng.uniform(r, horizon * height - r))
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(250, 240, 200))
    image = image.filter(ImageFilter.GaussianBlur(0.6))
    grain = rng.normal(0, 3, (height, width, 1)).astype(np.float32)
    return Image.fromarray(np.clip(np.asarray(image, np.float32) + grain, 0, 255).astype(np.uint8), "RGB")


def photo_jpeg(width: int, height: int, seed: int, quality: int) -> bytes:
    buffer = io.BytesIO()
    photo(width, height, seed).save(buffer, format="JPEG", quality=quality)  # 4:2:0, as cameras and sites save
    return buffer.getvalue()


def write_photo_shards(
    directory: Path, *, images: int, shard_size: int, sizes: tuple[tuple[int, int], ...], seed: int = 0
) -> list[Path]:
    """WebDataset shards of photo-like JPEGs, cycling through `sizes` and `QUALITIES`."""
    directory.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for start in range(0, images, shard_size):
        path = directory / f"shard-{start // shard_size:05d}.tar"
        with tarfile.open(path, "w") as archive:
            for index in range(start, min(images, start + shard_size)):
                width, height = sizes[index % len(sizes)]
                data = photo_jpeg(width, height, seed + index, QUALITIES[index % len(QUALITIES)])
                info = tarfile.TarInfo(f"{index:08d}.jpg")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths
