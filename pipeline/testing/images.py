"""Bytes of awkward images, for tests of the decode path and for synthetic shards.

Real datasets contain every oddity below, and each one once took down a job or
silently produced a wrong caption input (black backgrounds, clipped 16-bit
scans, sideways phone photos). Every generator is deterministic, so a shard
built from them has stable digests, and fast, so a test can call them freely.

Layout convention for the "regions" images: the image is split into vertical
thirds, and tests sample the centre pixel of each third (see ``third_centres``).
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image

Color = tuple[int, int, int]

DEFAULT_MAX_PIXELS = 64_000_000


def third_centres(width: int, height: int) -> list[tuple[int, int]]:
    """Sample points inside the left, middle and right thirds, far from JPEG/resize bleed."""
    return [((2 * i + 1) * width // 6, height // 2) for i in range(3)]


def _thirds(width: int) -> tuple[slice, slice, slice]:
    a, b = width // 3, 2 * width // 3
    return slice(0, a), slice(a, b), slice(b, width)


def _save(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def rgb_jpeg(width: int = 64, height: int = 48, color: Color = (200, 30, 30)) -> bytes:
    """A plain solid-colour baseline JPEG: the boring case everything else is measured against."""
    return _save(Image.new("RGB", (width, height), color), "JPEG", quality=95)


def png_rgba(width: int = 60, height: int = 30, color: Color = (255, 0, 0)) -> bytes:
    """RGBA PNG, thirds: opaque ``color``, ``color`` at alpha 128, fully transparent black."""
    pixels = np.zeros((height, width, 4), dtype=np.uint8)
    opaque, half, clear = _thirds(width)
    pixels[:, opaque] = (*color, 255)
    pixels[:, half] = (*color, 128)
    pixels[:, clear] = (0, 0, 0, 0)
    return _save(Image.fromarray(pixels), "PNG")


def png_la(width: int = 60, height: int = 30) -> bytes:
    """Gray+alpha PNG, thirds: opaque black, black at alpha 128, fully transparent black."""
    pixels = np.zeros((height, width, 2), dtype=np.uint8)
    opaque, half, clear = _thirds(width)
    pixels[:, opaque, 1] = 255
    pixels[:, half, 1] = 128
    pixels[:, clear, 1] = 0
    return _save(Image.fromarray(pixels), "PNG")


def png_palette_with_transparency(width: int = 60, height: int = 30) -> bytes:
    """Palette PNG with a tRNS chunk, thirds: opaque red, blue at alpha 128, fully transparent black."""
    indices = np.zeros((height, width), dtype=np.uint8)
    opaque, half, clear = _thirds(width)
    indices[:, opaque] = 1
    indices[:, half] = 2
    indices[:, clear] = 0
    image = Image.fromarray(indices).convert("P")
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255])
    return _save(image, "PNG", transparency=bytes([0, 255, 128]))


def cmyk_jpeg(width: int = 64, height: int = 48, cmyk: tuple[int, int, int, int] = (255, 0, 0, 0)) -> bytes:
    """A CMYK JPEG (pure cyan by default), as print workflows and some stock libraries ship."""
    return _save(Image.new("CMYK", (width, height), cmyk), "JPEG", quality=95)


def _gray16_regions(width: int, height: int, values: tuple[int, int, int]) -> Image.Image:
    pixels = np.zeros((height, width), dtype=np.uint16)
    for region, value in zip(_thirds(width), values):
        pixels[:, region] = value
    return Image.fromarray(pixels)


def png_16bit_gray(width: int = 60, height: int = 30, values: tuple[int, int, int] = (65535, 32768, 0)) -> bytes:
    """16-bit grayscale PNG (opens as I;16), thirds set to ``values``; naive convert clips these to white."""
    return _save(_gray16_regions(width, height, values), "PNG")


def tiff_16bit_gray(width: int = 60, height: int = 30, values: tuple[int, int, int] = (65535, 32768, 0)) -> bytes:
    """16-bit grayscale TIFF (opens as I;16), thirds set to ``values``, as scanners and microscopes write."""
    return _save(_gray16_regions(width, height, values), "TIFF")


def tiff_float_gray(width: int = 60, height: int = 30, values: tuple[float, float, float] = (1.0, 0.5, 0.0)) -> bytes:
    """32-bit float grayscale TIFF (opens as F), thirds set to ``values``."""
    pixels = np.zeros((height, width), dtype=np.float32)
    for region, value in zip(_thirds(width), values):
        pixels[:, region] = value
    return _save(Image.fromarray(pixels), "TIFF")


def tiff_int32_gray(width: int = 60, height: int = 30, values: tuple[int, int, int] = (200_000, 100_000, 0)) -> bytes:
    """32-bit integer grayscale TIFF (opens as I), thirds set to ``values``; defaults exceed the 16-bit range."""
    pixels = np.zeros((height, width), dtype=np.int32)
    for region, value in zip(_thirds(width), values):
        pixels[:, region] = value
    return _save(Image.fromarray(pixels), "TIFF")


def webp(width: int = 64, height: int = 48, color: Color = (30, 200, 30)) -> bytes:
    """A lossless solid-colour WEBP, so tests can compare exact pixel values."""
    return _save(Image.new("RGB", (width, height), color), "WEBP", lossless=True)


_FIRST_FRAME: Color = (255, 0, 0)
_LATER_FRAMES: tuple[Color, ...] = ((0, 0, 255), (0, 255, 0))


def _frames(count: int, size: tuple[int, int]) -> list[Image.Image]:
    colors = [_FIRST_FRAME] + [_LATER_FRAMES[i % len(_LATER_FRAMES)] for i in range(count - 1)]
    return [Image.new("RGB", size, c) for c in colors]


def _animated(fmt: str, frames: int, **params: object) -> bytes:
    if frames < 2:
        raise ValueError("an animation needs at least 2 frames")
    first, *rest = _frames(frames, (16, 16))
    buffer = io.BytesIO()
    first.save(buffer, fmt, save_all=True, append_images=rest, duration=100, loop=0, **params)
    return buffer.getvalue()


def animated_gif(frames: int = 3) -> bytes:
    """Animated GIF whose first frame is pure red and later frames blue/green."""
    return _animated("GIF", frames)


def animated_png(frames: int = 3) -> bytes:
    """APNG whose first frame is pure red and later frames blue/green."""
    return _animated("PNG", frames)


def animated_webp(frames: int = 3) -> bytes:
    """Lossless animated WEBP whose first frame is pure red and later frames blue/green."""
    return _animated("WEBP", frames, lossless=True)


def jpeg_with_exif_orientation(orientation: int = 6, width: int = 64, height: int = 32) -> bytes:
    """JPEG stored as width x height (left half red, right half blue) with an EXIF Orientation tag."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2 :] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())


def _noise_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(96, 128, 3), dtype=np.uint8)
    return _save(Image.fromarray(pixels), "JPEG", quality=90)


def truncated_jpeg() -> bytes:
    """A valid noisy JPEG cut in half: the header parses, the scan data runs out."""
    data = _noise_jpeg()
    return data[: len(data) // 2]


def broken_png() -> bytes:
    """A PNG whose IDAT payload is overwritten with garbage (CRC fixed up), so only the zlib stream is bad."""
    rng = np.random.default_rng(1)
    data = _save(Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)), "PNG")
    start = data.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", data[start : start + 4])
    payload = bytearray(data[start + 8 : start + 8 + length])
    payload[8:40] = b"\xff" * 32
    end = start + 12 + length
    return data[:start] + _png_chunk(b"IDAT", bytes(payload)) + data[end:]


def zero_bytes() -> bytes:
    """An empty member, as left behind by an interrupted upload."""
    return b""


def text_as_jpg() -> bytes:
    """Plain text that a careless exporter named .jpg."""
    return b"This is not an image. It is a caption file that was saved with the wrong extension.\n"


def decompression_bomb(pixels: int = 100_000_000) -> bytes:
    """A ~100-byte 1-bit PNG declaring at least ``pixels`` pixels; its zlib stream holds one row (Pillow blacks out the rest)."""
    side = math.isqrt(pixels - 1) + 1
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    first_row = b"\x00" * ((side + 7) // 8 + 1)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(first_row, 9))
        + _png_chunk(b"IEND", b"")
    )


TRICKY_IMAGES: dict[str, tuple[Callable[[], bytes], bool]] = {
    "rgb_jpeg": (rgb_jpeg, True),
    "png_rgba": (png_rgba, True),
    "png_la": (png_la, True),
    "png_palette_with_transparency": (png_palette_with_transparency, True),
    "cmyk_jpeg": (cmyk_jpeg, True),
    "png_16bit_gray": (png_16bit_gray, True),
    "tiff_16bit_gray": (tiff_16bit_gray, True),
    "tiff_float_gray": (tiff_float_gray, True),
    "tiff_int32_gray": (tiff_int32_gray, True),
    "webp": (webp, True),
    "animated_gif": (animated_gif, True),
    "animated_png": (animated_png, True),
    "animated_webp": (animated_webp, True),
    "jpeg_with_exif_orientation": (jpeg_with_exif_orientation, True),
    "truncated_jpeg": (truncated_jpeg, False),
    "broken_png": (broken_png, False),
    "zero_bytes": (zero_bytes, False),
    "text_as_jpg": (text_as_jpg, False),
    "decompression_bomb": (decompression_bomb, False),
}
"""Case name -> (generator, decodes under ``DEFAULT_MAX_PIXELS``), for building a shard of every oddity."""
