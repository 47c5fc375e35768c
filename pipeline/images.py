"""Decode a sample's image bytes into a loaded RGB image, or say precisely why not.

The prepare stage reads untrusted shards: any member may be empty, mislabeled,
truncated, a decompression bomb, or in a mode the model was never shown (CMYK,
16-bit, alpha). A bad member must become a row with a stable reason code, not a
crashed Ray task, and an odd-but-valid one must reach the model looking the way
a person would see it. So everything Pillow can raise for bad bytes is folded
into ``ImageDecodeError``, and every mode is normalised to what a viewer shows.

Nothing here touches process-wide Pillow settings (``Image.MAX_IMAGE_PIXELS``,
``ImageFile.LOAD_TRUNCATED_IMAGES``): workers share one interpreter with other
stages, and the pixel policy is the caller's ``max_pixels``.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Callable, Final

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DECODE_REASONS: Final[dict[str, str]] = {
    "empty_image": "The image member has zero bytes.",
    "unrecognized_image": "The bytes are not in any image format Pillow can identify (e.g. a text file named .jpg).",
    "too_many_pixels": "Width x height exceeds the configured pixel limit (decompression-bomb guard); rejected before decoding.",
    "corrupt_image": "Pillow identified the format but decoding failed (truncated JPEG, broken PNG, bad metadata, ...).",
}

_MAX_MESSAGE_CHARS: Final = 300
_WHITE: Final = (255, 255, 255)
_ALPHA_MODES: Final = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_UINT16_MAX: Final = 65535


class ImageDecodeError(Exception):
    """A sample's image bytes that cannot become an RGB image.

    ``reason`` is the stable code downstream tables group by; the message is for
    humans reading a failure row and may change between versions.
    """

    def __init__(self, reason: str, message: str) -> None:
        if reason not in DECODE_REASONS:
            raise ValueError(f"unknown decode reason {reason!r}; expected one of {sorted(DECODE_REASONS)}")
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type[ImageDecodeError], tuple[str, str]]:
        # Ray ships task exceptions between processes by pickling; the default
        # reduce would call cls(message) and lose (or break on) the reason.
        return (type(self), (self.reason, str(self)))


@dataclass(frozen=True)
class DecodedImage:
    """A fully loaded RGB image, detached from the bytes it came from.

    ``width`` and ``height`` are the upright image's full size, even where ``image`` was decoded smaller."""

    image: Image.Image
    width: int
    height: int
    format: str


# Given an image's stored (width, height), the smallest size it may be decoded at, or None for full size.
DecodeSize = Callable[[int, int], "tuple[int, int] | None"]


def decode_image(data: bytes, *, max_pixels: int, decode_size: DecodeSize | None = None) -> DecodedImage:
    """Decode ``data`` to an upright, fully loaded RGB image of at most ``max_pixels`` pixels.

    Animated images yield their first frame, the frame a thumbnail shows. With ``decode_size``, a JPEG is
    decoded at the smallest of 1/2, 1/4 or 1/8 scale that is still at least that size (Pillow's draft
    mode: the codec skips detail instead of decoding it and resizing it away).
    Raises ``ImageDecodeError`` for any bytes that cannot make such an image.
    """
    if len(data) == 0:
        raise ImageDecodeError("empty_image", "image member is empty (0 bytes)")
    source_format: str | None = None
    with warnings.catch_warnings():
        # Pillow warns above its own default limit; max_pixels is our policy.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as source:
                source_format = source.format
                width, height = source.size
                if width * height > max_pixels:
                    raise ImageDecodeError(
                        "too_many_pixels",
                        f"image has {width * height} pixels, over the limit of {max_pixels}",
                    )
                wanted = decode_size(width, height) if decode_size is not None and source.format == "JPEG" else None
                if wanted is not None:
                    source.draft(source.mode, wanted)  # the same mode: only the scale changes
                stored = source.size
                source.load()
                image = _to_rgb(ImageOps.exif_transpose(source))
        except ImageDecodeError:
            raise
        except UnidentifiedImageError as exc:
            raise ImageDecodeError(
                "unrecognized_image", f"bytes are not a recognized image format ({len(data)} bytes)"
            ) from exc
        except Image.DecompressionBombError as exc:
            raise ImageDecodeError(
                "too_many_pixels", _shorten(f"image refused by Pillow's decompression-bomb guard: {exc}")
            ) from exc
        except Exception as exc:
            raise ImageDecodeError("corrupt_image", _describe_failure(source_format, exc)) from exc
    if image.size != stored:  # turned upright by its EXIF orientation
        width, height = height, width
    return DecodedImage(image=image, width=width, height=height, format=source_format or "UNKNOWN")


def _describe_failure(source_format: str | None, exc: Exception) -> str:
    what = f"{source_format} image" if source_format else "image"
    detail = str(exc).strip() or type(exc).__name__
    return _shorten(f"cannot decode {what}: {detail}")


def _shorten(message: str) -> str:
    if len(message) <= _MAX_MESSAGE_CHARS:
        return message
    return message[: _MAX_MESSAGE_CHARS - 3] + "..."


def _to_rgb(image: Image.Image) -> Image.Image:
    """Return ``image`` as RGB the way a viewer would render it, reusing it when already RGB."""
    mode = image.mode
    if mode in ("I", "F") or mode.startswith("I;"):
        return _high_depth_to_rgb(image)
    if mode == "La":
        image = image.convert("LA")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        return _flatten_on_white(image.convert("RGBA"))
    if mode == "RGB":
        return image
    return image.convert("RGB")


def _flatten_on_white(rgba: Image.Image) -> Image.Image:
    """Composite onto white: transparent pixels often hold black, which reads as a black photo."""
    background = Image.new("RGB", rgba.size, _WHITE)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """Rescale 16/32-bit integer and float gray to 8 bits; Pillow's own convert clips them to white."""
    values = np.asarray(image)
    if image.mode == "F":
        values = np.where(np.isfinite(values), values, 0.0)
        peak = float(values.max()) if values.size else 0.0
        full_scale = 1.0 if peak <= 1.0 else peak
    elif image.mode == "I":
        peak = int(values.max()) if values.size else 0
        full_scale = float(_UINT16_MAX if peak <= _UINT16_MAX else peak)
    else:
        full_scale = float(_UINT16_MAX)
    scaled = values.astype(np.float32)
    scaled *= np.float32(255.0 / full_scale)
    np.clip(scaled, 0.0, 255.0, out=scaled)
    np.rint(scaled, out=scaled)
    gray = Image.fromarray(scaled.astype(np.uint8)).convert("RGB")
    transparent_value = image.info.get("transparency")
    if isinstance(transparent_value, (int, float)) and not isinstance(transparent_value, bool):
        opaque = Image.fromarray(np.where(values == transparent_value, 0, 255).astype(np.uint8))
        background = Image.new("RGB", gray.size, _WHITE)
        background.paste(gray, mask=opaque)
        return background
    return gray
