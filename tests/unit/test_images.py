"""Unit tests for pipeline.images: pixel-exact mode handling and stable failure reasons."""

from __future__ import annotations

import io
import pickle
import time
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline.images import DECODE_REASONS, DecodedImage, ImageDecodeError, decode_image
from pipeline.testing import images as tricky

LIMIT = tricky.DEFAULT_MAX_PIXELS


def decode(data: bytes, max_pixels: int = LIMIT) -> DecodedImage:
    return decode_image(data, max_pixels=max_pixels)


def pixel(result: DecodedImage, xy: tuple[int, int]) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.asarray(result.image)[xy[1], xy[0]])  # type: ignore[return-value]


def thirds(result: DecodedImage) -> list[tuple[int, int, int]]:
    return [pixel(result, xy) for xy in tricky.third_centres(result.width, result.height)]


def assert_close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int) -> None:
    assert len(actual) == len(expected)
    assert all(abs(a - e) <= tolerance for a, e in zip(actual, expected)), f"{actual} != {expected} ± {tolerance}"


def assert_rgb_result(result: DecodedImage) -> None:
    assert result.image.mode == "RGB"
    assert result.image.size == (result.width, result.height)


@pytest.fixture(autouse=True)
def _pillow_globals_untouched() -> Iterator[None]:
    """Every test doubles as a check that decoding leaves process-wide Pillow settings alone."""
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    yield
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before


# --- decodable inputs -------------------------------------------------------------------------


def test_rgb_jpeg_keeps_size_colour_and_format() -> None:
    result = decode(tricky.rgb_jpeg(width=64, height=48, color=(200, 30, 30)))
    assert_rgb_result(result)
    assert (result.width, result.height, result.format) == (64, 48, "JPEG")
    assert_close(pixel(result, (32, 24)), (200, 30, 30), tolerance=4)


def test_rgba_flattens_onto_white_not_black() -> None:
    result = decode(tricky.png_rgba(color=(255, 0, 0)))
    assert_rgb_result(result)
    assert result.format == "PNG"
    opaque, half, clear = thirds(result)
    assert opaque == (255, 0, 0)
    assert_close(half, (255, 127, 127), tolerance=1)
    assert clear == (255, 255, 255)


def test_la_flattens_onto_white() -> None:
    result = decode(tricky.png_la())
    assert_rgb_result(result)
    opaque, half, clear = thirds(result)
    assert opaque == (0, 0, 0)
    assert_close(half, (127, 127, 127), tolerance=1)
    assert clear == (255, 255, 255)


def test_palette_transparency_flattens_onto_white() -> None:
    data = tricky.png_palette_with_transparency()
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.mode == "P" and "transparency" in raw.info
    result = decode(data)
    assert_rgb_result(result)
    opaque, half, clear = thirds(result)
    assert opaque == (255, 0, 0)
    assert_close(half, (127, 127, 255), tolerance=1)
    assert clear == (255, 255, 255)


@pytest.mark.parametrize("mode", ["RGBa", "La", "PA"])
def test_other_alpha_modes_flatten_onto_white(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """These modes are rare on disk, so feed them in by making Image.open return them."""
    transparent = Image.new(mode, (4, 4))
    assert transparent.getpixel((0, 0))[-1] == 0  # type: ignore[index]
    transparent.format = "TEST"
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: transparent)
    result = decode(b"not read")
    assert_rgb_result(result)
    assert pixel(result, (1, 1)) == (255, 255, 255)


def test_cmyk_jpeg_converts_to_rgb() -> None:
    data = tricky.cmyk_jpeg(cmyk=(255, 0, 0, 0))
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.mode == "CMYK"
    result = decode(data)
    assert_rgb_result(result)
    assert result.format == "JPEG"
    assert_close(pixel(result, (10, 10)), (0, 255, 255), tolerance=4)


@pytest.mark.parametrize(
    ("generator", "expected_format"),
    [(tricky.png_16bit_gray, "PNG"), (tricky.tiff_16bit_gray, "TIFF")],
)
def test_16bit_gray_is_rescaled_not_clipped(generator: Callable[[], bytes], expected_format: str) -> None:
    data = generator()
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.mode.startswith("I;16")
    result = decode(data)
    assert_rgb_result(result)
    assert result.format == expected_format
    full, half, zero = thirds(result)
    assert full == (255, 255, 255)
    assert half[0] in (127, 128) and half[0] == half[1] == half[2]
    assert zero == (0, 0, 0)


def test_16bit_gradient_is_monotonic_and_spans_full_range() -> None:
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)[None, :].repeat(4, axis=0)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, "PNG")
    gray = np.asarray(decode(buffer.getvalue()).image)[0, :, 0].astype(int)
    assert gray[0] == 0 and gray[-1] == 255
    assert np.all(np.diff(gray) >= 0)
    assert len(np.unique(gray)) > 250


@pytest.mark.parametrize("mode", ["I;16B", "I;16L"])
def test_16bit_byte_orders_rescale_the_same(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = Image.new(mode, (4, 4), 32768)
    raw.format = "TEST"
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: raw)
    assert pixel(decode(b"not read"), (0, 0))[0] in (127, 128)


def test_int32_gray_over_16bit_range_scales_by_its_max() -> None:
    data = tricky.tiff_int32_gray(values=(200_000, 100_000, 0))
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.mode == "I"
    top, middle, zero = thirds(decode(data))
    assert top == (255, 255, 255)
    assert middle[0] in (127, 128)
    assert zero == (0, 0, 0)


def test_int32_gray_within_16bit_range_is_treated_as_16bit() -> None:
    top, middle, zero = thirds(decode(tricky.tiff_int32_gray(values=(65535, 32768, 0))))
    assert top == (255, 255, 255)
    assert middle[0] in (127, 128)
    assert zero == (0, 0, 0)


def test_float_gray_in_unit_range() -> None:
    data = tricky.tiff_float_gray(values=(1.0, 0.5, 0.0))
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.mode == "F"
    one, half, zero = thirds(decode(data))
    assert one == (255, 255, 255)
    assert half[0] in (127, 128)
    assert zero == (0, 0, 0)


def test_float_gray_above_one_scales_by_max() -> None:
    one, half, zero = thirds(decode(tricky.tiff_float_gray(values=(1000.0, 500.0, 0.0))))
    assert one == (255, 255, 255)
    assert half[0] in (127, 128)
    assert zero == (0, 0, 0)


def test_16bit_gray_png_with_transparent_value_flattens_onto_white() -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.array([[0, 65535]], dtype=np.uint16)).save(buffer, "PNG", transparency=0)
    result = decode(buffer.getvalue())
    assert pixel(result, (0, 0)) == (255, 255, 255)
    assert pixel(result, (1, 0)) == (255, 255, 255)
    buffer = io.BytesIO()
    Image.fromarray(np.array([[0, 65535]], dtype=np.uint16)).save(buffer, "PNG", transparency=65535)
    result = decode(buffer.getvalue())
    assert pixel(result, (0, 0)) == (0, 0, 0)


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("1", 1, (255, 255, 255)),
        ("L", 77, (77, 77, 77)),
        ("P", 0, (0, 0, 0)),
        ("HSV", (0, 255, 255), (255, 0, 0)),
        ("YCbCr", (76, 85, 255), (254, 0, 0)),
        ("LAB", (128, 128, 128), (119, 119, 119)),
    ],
)
def test_remaining_modes_convert_to_rgb(
    mode: str, value: object, expected: tuple[int, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = Image.new(mode, (4, 4), value)  # type: ignore[arg-type]
    raw.format = "TEST"
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: raw)
    result = decode(b"not read")
    assert_rgb_result(result)
    assert_close(pixel(result, (2, 2)), expected, tolerance=2)


def test_grayscale_tiff_and_palette_gif_read_from_bytes() -> None:
    for fmt, image in [("TIFF", Image.new("L", (8, 8), 90)), ("GIF", Image.new("RGB", (8, 8), (0, 0, 255)))]:
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        result = decode(buffer.getvalue())
        assert result.format == fmt
        assert pixel(result, (4, 4)) == image.convert("RGB").getpixel((4, 4))


def test_webp_decodes_exactly() -> None:
    result = decode(tricky.webp(color=(30, 200, 30)))
    assert_rgb_result(result)
    assert (result.width, result.height, result.format) == (64, 48, "WEBP")
    assert pixel(result, (5, 5)) == (30, 200, 30)


@pytest.mark.parametrize(
    ("generator", "expected_format"),
    [(tricky.animated_gif, "GIF"), (tricky.animated_png, "PNG"), (tricky.animated_webp, "WEBP")],
)
def test_animated_images_use_first_frame(generator: Callable[[], bytes], expected_format: str) -> None:
    data = generator()
    with Image.open(io.BytesIO(data)) as raw:
        assert getattr(raw, "n_frames", 1) == 3
    result = decode(data)
    assert_rgb_result(result)
    assert result.format == expected_format
    assert pixel(result, (8, 8)) == (255, 0, 0)


def test_exif_orientation_6_rotates_to_display_orientation() -> None:
    result = decode(tricky.jpeg_with_exif_orientation(orientation=6, width=64, height=32))
    assert_rgb_result(result)
    assert (result.width, result.height) == (32, 64)
    # Orientation 6 means "rotate 90° clockwise to display": the stored left half ends up on top.
    assert_close(pixel(result, (16, 10)), (255, 0, 0), tolerance=6)
    assert_close(pixel(result, (16, 54)), (0, 0, 255), tolerance=6)


@pytest.mark.parametrize(("orientation", "size"), [(1, (64, 32)), (3, (64, 32)), (8, (32, 64))])
def test_other_exif_orientations(orientation: int, size: tuple[int, int]) -> None:
    result = decode(tricky.jpeg_with_exif_orientation(orientation=orientation, width=64, height=32))
    assert (result.width, result.height) == size
    if orientation == 3:
        assert_close(pixel(result, (10, 16)), (0, 0, 255), tolerance=6)


def test_result_is_detached_from_source_bytes() -> None:
    data = bytearray(tricky.webp(color=(30, 200, 30)))
    result = decode(bytes(data))
    data[:] = b"\x00" * len(data)
    assert result.image.getpixel((1, 1)) == (30, 200, 30)
    assert np.asarray(result.image).shape == (48, 64, 3)


def test_pixel_limit_is_inclusive() -> None:
    data = tricky.rgb_jpeg(width=64, height=48)
    assert decode(data, max_pixels=64 * 48).width == 64
    with pytest.raises(ImageDecodeError) as info:
        decode(data, max_pixels=64 * 48 - 1)
    assert info.value.reason == "too_many_pixels"
    assert str(info.value) == f"image has {64 * 48} pixels, over the limit of {64 * 48 - 1}"


def test_decoded_image_is_frozen() -> None:
    result = decode(tricky.rgb_jpeg())
    with pytest.raises(AttributeError):
        result.width = 1  # type: ignore[misc]


# --- failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("generator", "reason"),
    [
        (tricky.zero_bytes, "empty_image"),
        (tricky.text_as_jpg, "unrecognized_image"),
        (tricky.truncated_jpeg, "corrupt_image"),
        (tricky.broken_png, "corrupt_image"),
        (tricky.decompression_bomb, "too_many_pixels"),
    ],
)
def test_bad_bytes_raise_with_reason(generator: Callable[[], bytes], reason: str) -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode(generator())
    assert info.value.reason == reason
    message = str(info.value)
    assert message and len(message) <= 300
    assert "Traceback" not in message and "\n" not in message


def test_truncated_jpeg_message_names_format_and_pillow_error() -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode(tricky.truncated_jpeg())
    assert str(info.value).startswith("cannot decode JPEG image: ")
    assert "truncated" in str(info.value)


def test_unrecognized_message_has_no_object_address() -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode(tricky.text_as_jpg())
    assert "0x" not in str(info.value)


@pytest.mark.parametrize("exception", [SyntaxError("bad"), ValueError("bad"), EOFError(), KeyError("x")])
def test_any_pillow_exception_during_load_becomes_corrupt_image(
    exception: Exception, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_load(self: Image.Image) -> None:
        raise exception

    monkeypatch.setattr(ImageFile.ImageFile, "load", failing_load)
    with pytest.raises(ImageDecodeError) as info:
        decode(tricky.rgb_jpeg())
    assert info.value.reason == "corrupt_image"
    assert info.value.__cause__ is exception


def test_bomb_is_rejected_from_the_header_quickly() -> None:
    data = tricky.decompression_bomb(pixels=100_000_000)
    assert len(data) < 1024
    started = time.perf_counter()
    with pytest.raises(ImageDecodeError) as info:
        decode(data, max_pixels=64_000_000)
    assert time.perf_counter() - started < 0.5
    assert info.value.reason == "too_many_pixels"
    assert "over the limit of 64000000" in str(info.value)


def test_bomb_is_rejected_before_load(monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[object] = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self))
    with pytest.raises(ImageDecodeError):
        decode(tricky.decompression_bomb(pixels=100_000_000))
    assert loads == []


def test_bomb_over_pillows_hard_limit_maps_to_too_many_pixels() -> None:
    data = tricky.decompression_bomb(pixels=400_000_000)
    with pytest.raises(ImageDecodeError) as info:
        decode(data, max_pixels=10**12)
    assert info.value.reason == "too_many_pixels"


def test_bomb_is_stopped_by_the_limit_not_by_its_bytes() -> None:
    """Pillow fills the bomb's missing rows with black, so only the header check protects a worker."""
    result = decode(tricky.decompression_bomb(pixels=1_000_000), max_pixels=2_000_000)
    assert (result.width, result.height) == (1000, 1000)


def test_no_decompression_bomb_warning_escapes() -> None:
    data = tricky.decompression_bomb(pixels=100_000_000)
    with warnings.catch_warnings(record=True) as unguarded:
        warnings.simplefilter("always")
        Image.open(io.BytesIO(data)).close()
    assert any(issubclass(w.category, Image.DecompressionBombWarning) for w in unguarded), "input must trigger it"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageDecodeError):
            decode(data, max_pixels=64_000_000)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_warning_filters_are_restored() -> None:
    before = list(warnings.filters)
    with pytest.raises(ImageDecodeError):
        decode(tricky.decompression_bomb())
    assert warnings.filters == before


def test_error_pickles_with_reason() -> None:
    error = ImageDecodeError("corrupt_image", "cannot decode JPEG image: image file is truncated")
    clone = pickle.loads(pickle.dumps(error))
    assert isinstance(clone, ImageDecodeError)
    assert (clone.reason, str(clone)) == (error.reason, str(error))


def test_unknown_reason_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        ImageDecodeError("weird", "x")


def test_decode_reasons_are_exactly_the_documented_codes() -> None:
    assert set(DECODE_REASONS) == {"empty_image", "unrecognized_image", "too_many_pixels", "corrupt_image"}
    assert all(isinstance(v, str) and v and "\n" not in v for v in DECODE_REASONS.values())


# --- the shared catalogue ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(tricky.TRICKY_IMAGES))
def test_tricky_catalogue_matches_decoder(name: str) -> None:
    generator, should_decode = tricky.TRICKY_IMAGES[name]
    data = generator()
    assert isinstance(data, bytes)
    if should_decode:
        assert_rgb_result(decode(data))
    else:
        with pytest.raises(ImageDecodeError):
            decode(data)


@pytest.mark.parametrize("name", sorted(tricky.TRICKY_IMAGES))
def test_tricky_generators_are_deterministic(name: str) -> None:
    generator, _ = tricky.TRICKY_IMAGES[name]
    assert generator() == generator()
