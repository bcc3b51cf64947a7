"""Images: resize modes, EXIF orientation, colour modes to RGB, draft decoding, pixel limit,
size filters and the bad-bytes classes, each mapped to its skip reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps
from test_data_helpers import gradient_jpeg, image_bytes, png_header_only

from data_tools.images import ImageOptions, encode_image
from data_tools.skips import Skip


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def three_bands(size: tuple[int, int]) -> bytes:
    """Red | green | blue vertical thirds, as PNG (lossless, so colours are exact)."""
    width, height = size
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 3] = (255, 0, 0)
    pixels[:, width // 3 : 2 * width // 3] = (0, 255, 0)
    pixels[:, 2 * width // 3 :] = (0, 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(("mode", "expected"), [
    ("no", (300, 150)),
    ("keep_ratio", (200, 100)),
    ("keep_ratio_largest", (100, 50)),
    ("center_crop", (100, 100)),
    ("border", (100, 100)),
])
def test_resize_modes_give_img2dataset_geometry(mode: str, expected: tuple[int, int]) -> None:
    result = encode_image(three_bands((300, 150)), ImageOptions(image_size=100, resize_mode=mode,
                                                                output_format="png"))
    image = decoded(result.data)
    assert image.size == expected == (result.width, result.height)
    assert (result.original_width, result.original_height) == (300, 150)
    pixels = np.asarray(image.convert("RGB")).astype(int)
    if mode == "center_crop":  # the middle square: a quarter of red, green, a quarter of blue
        assert tuple(pixels[50, 50]) == (0, 255, 0)
        assert tuple(pixels[50, 10]) == (255, 0, 0) and tuple(pixels[50, 89]) == (0, 0, 255)
        assert tuple(pixels[50, 30]) == tuple(pixels[50, 69]) == (0, 255, 0)
    if mode == "border":  # the 100x50 picture sits between black bars
        assert tuple(pixels[5, 50]) == tuple(pixels[95, 50]) == (0, 0, 0)
        assert tuple(pixels[50, 5]) == (255, 0, 0) and tuple(pixels[50, 95]) == (0, 0, 255)


def test_exif_orientation_is_applied() -> None:
    image = Image.open(io.BytesIO(three_bands((60, 30)))).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    result = encode_image(buffer.getvalue(), ImageOptions(resize_mode="no", output_format="png"))
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(buffer.getvalue())))
    out = decoded(result.data)
    assert out.size == (30, 60) == upright.size
    assert (result.original_width, result.original_height) == (30, 60)
    diff = np.abs(np.asarray(out).astype(int) - np.asarray(upright.convert("RGB")).astype(int))
    assert diff.mean() < 2
    assert "exif" not in out.info  # the orientation is baked in, no tag left to apply twice


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _transparent_palette() -> bytes:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.info["transparency"] = 1
    return _png(image)


COLOUR_CASES = {
    "CMYK": (image_bytes(mode="CMYK", color=(0, 255, 255, 0)), (255, 0, 0)),
    "P": (_png(Image.new("RGB", (8, 8), (0, 0, 255)).convert("P")), (0, 0, 255)),
    "P+transparency": (_transparent_palette(), (255, 255, 255)),
    "LA": (_png(Image.new("LA", (8, 8), (0, 0))), (255, 255, 255)),
    "RGBA half": (_png(Image.new("RGBA", (8, 8), (0, 0, 0, 128))), (127, 127, 127)),
    "I;16": (_png(Image.fromarray(np.full((8, 8), 40000, np.uint16))), (156, 156, 156)),
    "1": (_png(Image.new("1", (8, 8), 1)), (255, 255, 255)),
    "L": (_png(Image.new("L", (8, 8), 70)), (70, 70, 70)),
    "RGB tRNS": (_png(Image.new("RGB", (8, 8), (9, 9, 9))), (9, 9, 9)),
}


@pytest.mark.parametrize("case", COLOUR_CASES)
def test_every_colour_mode_becomes_rgb(case: str) -> None:
    data, expected = COLOUR_CASES[case]
    result = encode_image(data, ImageOptions(resize_mode="no", output_format="png"))
    image = decoded(result.data)
    assert image.mode == "RGB"
    got = np.asarray(image).reshape(-1, 3).mean(axis=0)
    assert np.abs(got - expected).max() <= 3, (case, got)


def test_alpha_is_composited_over_white() -> None:
    pixels = np.zeros((4, 4, 4), np.uint8)
    pixels[..., 0] = 255
    pixels[:2, :, 3] = 255  # top half opaque red, bottom half fully transparent
    result = encode_image(_png(Image.fromarray(pixels, "RGBA")),
                          ImageOptions(resize_mode="no", output_format="png"))
    out = np.asarray(decoded(result.data))
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[3, 3]) == (255, 255, 255)


def test_large_jpeg_is_decoded_in_draft_mode_when_downscaling(monkeypatch) -> None:
    sources = []
    original = Image.Image.resize

    def recording_resize(self, size, *args, **kwargs):  # noqa: ANN001, ANN202
        sources.append(self.size)
        return original(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording_resize)
    result = encode_image(gradient_jpeg((2048, 1536)), ImageOptions(image_size=128))
    assert (result.width, result.height) == (171, 128)
    assert sources and max(w for w, _ in sources) <= 256  # libjpeg scaled by 1/8, not PIL


def test_decompression_bomb_is_skipped_before_decoding() -> None:
    with pytest.raises(Skip) as skip:
        encode_image(png_header_only(100_000, 100_000), ImageOptions())
    assert skip.value.reason == "too_many_pixels"


def test_pixel_limit_is_configurable_and_covers_the_resized_output() -> None:
    with pytest.raises(Skip) as skip:
        encode_image(image_bytes((100, 100)), ImageOptions(max_pixels=9_999))
    assert skip.value.reason == "too_many_pixels"
    strip = image_bytes((1, 5000), fmt="PNG")  # to a 256 short side: 256 x 1.28M pixels
    with pytest.raises(Skip) as skip:
        encode_image(strip, ImageOptions(image_size=256))
    assert skip.value.reason == "too_many_pixels"
    assert decoded(encode_image(strip, ImageOptions(resize_mode="center_crop")).data).size == (
        256, 256)


@pytest.mark.parametrize(("size", "options", "reason"), [
    ((40, 30), ImageOptions(min_image_size=31), "image_too_small"),
    ((90, 30), ImageOptions(max_aspect_ratio=2.5), "aspect_ratio_too_large"),
])
def test_size_filters(size: tuple[int, int], options: ImageOptions, reason: str) -> None:
    with pytest.raises(Skip) as skip:
        encode_image(image_bytes(size), options)
    assert skip.value.reason == reason
    relaxed = ImageOptions(min_image_size=30, max_aspect_ratio=3.0)
    assert encode_image(image_bytes(size), relaxed).original_width == size[0]


@pytest.mark.parametrize(("fmt", "pil_format"), [("png", "PNG"), ("webp", "WEBP"),
                                                  ("jpg", "JPEG")])
def test_output_formats(fmt: str, pil_format: str) -> None:
    result = encode_image(image_bytes((64, 64)), ImageOptions(image_size=32, output_format=fmt))
    assert result.ext == fmt and decoded(result.data).format == pil_format


def test_quality_changes_jpeg_bytes() -> None:
    data = gradient_jpeg((128, 128))
    low = encode_image(data, ImageOptions(image_size=64, quality=20)).data
    high = encode_image(data, ImageOptions(image_size=64, quality=95)).data
    assert len(low) < len(high)


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "empty_file"),
    (b"<html><body>404 not found</body></html>", "not_an_image"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not_an_image"),
    (gradient_jpeg((256, 256))[:1500], "truncated_image"),
    (png_header_only(16, 16, pixel_data=b"not a zlib stream" * 8), "corrupt_image"),
])
def test_bad_bytes_are_classified(data: bytes, reason: str) -> None:
    with pytest.raises(Skip) as skip:
        encode_image(data, ImageOptions())
    assert skip.value.reason == reason
