"""The CPU side's shortcuts change nothing the model sees beyond stated tolerances.

- Pixels travel as the processor's resized uint8 values; scaled on the model actor they equal the
  processor's float32 arrays to float rounding (1e-6), for LLaVA-1.5 (336 px) and LLaVA-NeXT (tiles).
- A JPEG decoded at reduced scale (Pillow's draft mode) is never smaller than what the processor resizes
  to, keeps the image's full upright size in the row, and after preprocessing differs from a full decode by
  under one grey level on average.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pixels import model_pixels

from pipeline.images import decode_image
from pipeline.inputs import InputBuilder
from pipeline.testing.bench_model import build_family_processor
from pipeline.testing.photos import photo_jpeg

MAX_PIXELS = 64_000_000


@pytest.fixture(scope="module", params=["llava-1.5", "llava-next"])
def family(request) -> tuple[str, object]:
    return request.param, build_family_processor(request.param)


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return [photo_jpeg(1024, 768, 1, 90), photo_jpeg(640, 480, 2, 85), photo_jpeg(768, 1024, 3, 95)]


def test_uint8_pixels_scaled_on_the_model_side_equal_the_processor(family, photos) -> None:
    name, processor = family
    builder = InputBuilder(processor)
    assert builder.uint8_pixels, f"{name}: the PIL backend hands back uint8 pixels"
    rendered = builder.render("Describe the image.")
    for data in photos:
        image = decode_image(data, max_pixels=MAX_PIXELS).image
        arrays, replacement = builder.image_arrays(image)
        reference = processor(images=[image], text=[rendered], return_tensors="np")
        assert arrays["pixel_values"].dtype == np.uint8
        assert arrays["pixel_values"].nbytes * 4 == reference["pixel_values"][0].nbytes
        np.testing.assert_allclose(model_pixels(processor, arrays), reference["pixel_values"][0], rtol=0, atol=1e-6)
        assert builder.token_ids([rendered], replacement) == [reference["input_ids"][0].tolist()]
        for other in set(arrays) - {"pixel_values"}:
            np.testing.assert_array_equal(arrays[other], reference[other][0])


def test_reduced_scale_decode_is_never_smaller_than_the_processor_needs(photos) -> None:
    builder = InputBuilder(build_family_processor("llava-1.5"))
    assert builder.decode_size(1024, 768) == (448, 336)
    assert builder.decode_size(768, 1024) == (336, 448)
    assert builder.decode_size(300, 200) is None, "an image already smaller than the input is decoded whole"
    for data in photos:
        full = decode_image(data, max_pixels=MAX_PIXELS)
        reduced = decode_image(data, max_pixels=MAX_PIXELS, decode_size=builder.decode_size)
        assert (reduced.width, reduced.height) == (full.width, full.height), "the row keeps the full size"
        wanted = builder.decode_size(full.width, full.height)
        assert reduced.image.width >= wanted[0] and reduced.image.height >= wanted[1]
        if full.width >= 2 * wanted[0] and full.height >= 2 * wanted[1]:
            assert reduced.image.width < full.image.width, "a photo twice the input size decodes smaller"
        else:
            assert reduced.image.size == full.image.size
        difference = np.abs(
            builder.image_arrays(reduced.image)[0]["pixel_values"].astype(np.int16)
            - builder.image_arrays(full.image)[0]["pixel_values"].astype(np.int16)
        )
        assert difference.mean() < 1.0, f"mean difference {difference.mean():.2f} grey levels"


def test_reduced_scale_decode_keeps_the_upright_size_of_a_rotated_photo() -> None:
    builder = InputBuilder(build_family_processor("llava-1.5"))
    stored = Image.open(io.BytesIO(photo_jpeg(1024, 768, 4, 90)))
    exif = stored.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=90, exif=exif)
    decoded = decode_image(buffer.getvalue(), max_pixels=MAX_PIXELS, decode_size=builder.decode_size)
    assert (decoded.width, decoded.height) == (768, 1024)
    assert decoded.image.width < decoded.image.height


def test_tiling_processors_and_other_formats_decode_at_full_size() -> None:
    next_builder = InputBuilder(build_family_processor("llava-next"))
    assert next_builder.decode_size(2048, 1536) is None, "LLaVA-NeXT picks its grid from the decoded size"
    builder = InputBuilder(build_family_processor("llava-1.5"))
    buffer = io.BytesIO()
    Image.open(io.BytesIO(photo_jpeg(1024, 768, 5, 90))).save(buffer, format="PNG")
    decoded = decode_image(buffer.getvalue(), max_pixels=MAX_PIXELS, decode_size=builder.decode_size)
    assert decoded.image.size == (1024, 768), "draft mode exists for JPEG only"


def test_token_ids_are_the_same_from_the_cache(family) -> None:
    _, processor = family
    builder = InputBuilder(processor)
    rendered = [builder.render("Describe the image."), builder.render("What colour is the shape?")]
    first = builder.token_ids(rendered, "<image>" * 5)
    other = builder.token_ids(rendered, "<image>" * 7)
    assert builder.token_ids(rendered, "<image>" * 5) == first
    assert [len(a) + 2 for a in first] == [len(b) for b in other]
    first[0].append(-1)  # callers get their own lists
    assert builder.token_ids(rendered, "<image>" * 5)[0][-1] != -1
