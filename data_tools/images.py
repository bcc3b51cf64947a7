"""Decode, normalise, resize and re-encode one image, or say why it cannot be used.

The order of operations is chosen for speed and safety:

1. Only the header is parsed first. The pixel count is checked against ``max_pixels`` before
   any pixel is decoded (decompression bombs), and the size filters run on the header too, so
   rejected images cost almost nothing.
2. JPEGs that will be downscaled are decoded in *draft* mode: libjpeg scales by 1/2, 1/4 or
   1/8 inside the DCT, never below the requested size, which makes decoding several times
   cheaper; the final resize then works from the smaller image.
3. EXIF orientation is applied, every colour mode becomes RGB (alpha composited over white,
   16-bit greyscale scaled rather than clipped), and the image is resized and encoded.

Only common raster formats are opened (``SAFE_FORMATS``): Pillow would otherwise also try
formats such as EPS, whose loader runs Ghostscript on the file.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from data_tools.skips import Skip

RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
OUTPUT_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
# Pillow's own default decompression-bomb threshold (about 89.5 megapixels).
DEFAULT_MAX_PIXELS = 89_478_485
# Decoders that may be tried on input bytes (MPO, the multi-picture JPEG of phone cameras, is
# opened by the JPEG decoder). Those missing from this Pillow build are left out.
_CANDIDATE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM", "ICO", "JPEG2000", "AVIF")
Image.init()
SAFE_FORMATS = tuple(f for f in _CANDIDATE_FORMATS if f in Image.OPEN)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
# EXIF orientation tag values 2..8 and the transposition that makes the image upright.
_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT,),
    3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,),
    5: (Image.Transpose.TRANSPOSE,),
    6: (Image.Transpose.ROTATE_270,),
    7: (Image.Transpose.TRANSVERSE,),
    8: (Image.Transpose.ROTATE_90,),
}
_BORDER_COLOR = (0, 0, 0)  # img2dataset pads with black
_ALPHA_BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class ImageOptions:
    """How images are filtered, resized and encoded."""

    image_size: int = 256
    resize_mode: str = "keep_ratio"
    output_format: str = "jpg"
    quality: int = 95
    min_image_size: int = 0
    max_aspect_ratio: float = math.inf
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize mode {self.resize_mode!r} not in {RESIZE_MODES}")
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output format {self.output_format!r} not in {list(OUTPUT_FORMATS)}")
        if self.image_size < 1 or self.max_pixels < 1 or not 1 <= self.quality <= 100:
            raise ValueError("image size and max pixels must be >= 1, quality in 1..100")


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    ext: str
    width: int
    height: int
    original_width: int
    original_height: int


def encode_image(data: bytes, options: ImageOptions) -> EncodedImage:
    """Decode ``data`` and return it resized and re-encoded, or raise :class:`Skip`."""
    with warnings.catch_warnings():
        # Corrupt EXIF, palette transparency and similar warnings are noise at crawl scale.
        warnings.simplefilter("ignore")
        image = _open(data)
        try:
            return _convert(image, options)
        finally:
            image.close()


def _open(data: bytes) -> Image.Image:
    if not data:
        raise Skip("empty_file")
    try:
        return Image.open(io.BytesIO(data), formats=SAFE_FORMATS)
    except UnidentifiedImageError:
        raise Skip("not_an_image") from None
    except Image.DecompressionBombError as error:
        # Pillow's own guard (twice Image.MAX_IMAGE_PIXELS) also caps --max-pixels.
        raise Skip("too_many_pixels", str(error)) from None
    except Exception as error:  # any header parser failure means a bad file
        raise Skip("corrupt_image", repr(error)) from None


def _convert(image: Image.Image, options: ImageOptions) -> EncodedImage:
    stored_width, stored_height = image.size
    if stored_width < 1 or stored_height < 1:
        raise Skip("corrupt_image", f"size {image.size}")
    if stored_width * stored_height > options.max_pixels:
        raise Skip("too_many_pixels", f"{stored_width}x{stored_height}")
    # Size filters and the output size are symmetric in width and height, so they can run on
    # the stored size before the orientation is known.
    _check_filters(stored_width, stored_height, options)
    stored_scaled = _scaled_size(stored_width, stored_height, options)
    if _output_pixels(stored_scaled, options) > options.max_pixels:
        # A 1x20000 strip brought to a 256-pixel short side would need gigabytes.
        raise Skip("too_many_pixels", f"resized to {stored_scaled[0]}x{stored_scaled[1]}")
    is_jpeg = image.format in ("JPEG", "MPO")
    if is_jpeg and stored_scaled[0] < stored_width and stored_scaled[1] < stored_height:
        # Draft is only a speed-up: if it fails the full decode below is still correct.
        with contextlib.suppress(Exception):
            image.draft(None, stored_scaled)
    _load(image)
    # Read EXIF only now: for PNG, reading it loads (decodes) the image as a side effect.
    orientation = _orientation(image)
    for method in _TRANSPOSE.get(orientation, ()):
        image = image.transpose(method)
    swapped = orientation in (5, 6, 7, 8)
    width, height = (stored_height, stored_width) if swapped else (stored_width, stored_height)
    scaled = (stored_scaled[1], stored_scaled[0]) if swapped else stored_scaled
    image = _resize(to_rgb(image), scaled, options)
    return EncodedImage(
        data=_encode(image, options),
        ext=options.output_format,
        width=image.width,
        height=image.height,
        original_width=width,
        original_height=height,
    )


def _orientation(image: Image.Image) -> int:
    """EXIF orientation (1..8); a missing or corrupt EXIF block counts as upright."""
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block must not lose a good image
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _check_filters(width: int, height: int, options: ImageOptions) -> None:
    if min(width, height) < options.min_image_size:
        raise Skip("image_too_small", f"{width}x{height}")
    if max(width, height) / min(width, height) > options.max_aspect_ratio:
        raise Skip("aspect_ratio_too_large", f"{width}x{height}")


def _scaled_size(width: int, height: int, options: ImageOptions) -> tuple[int, int]:
    """Size the whole image is scaled to (before any crop or border), as img2dataset does.

    ``keep_ratio`` and ``center_crop`` bring the smaller side to ``image_size``;
    ``keep_ratio_largest`` and ``border`` bring the larger side there; ``no`` keeps the size.
    """
    size = options.image_size
    if options.resize_mode == "no":
        return width, height
    fit_smaller = options.resize_mode in ("keep_ratio", "center_crop")
    scale_by_width = (width <= height) if fit_smaller else (width >= height)
    if scale_by_width:
        return size, max(1, round(height * size / width))
    return max(1, round(width * size / height)), size


def _output_pixels(scaled: tuple[int, int], options: ImageOptions) -> int:
    if options.resize_mode in ("center_crop", "border"):
        return options.image_size**2  # only the square crop or canvas is ever allocated
    return scaled[0] * scaled[1]


def _load(image: Image.Image) -> None:
    try:
        image.load()
    except OSError as error:
        reason = "truncated_image" if "truncated" in str(error).lower() else "corrupt_image"
        raise Skip(reason, str(error)) from None
    except Exception as error:  # decoders raise many types on bad data
        raise Skip("corrupt_image", repr(error)) from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB: alpha over white, 16-bit greyscale scaled to 8 bits."""
    try:
        if image.mode in _SIXTEEN_BIT_MODES:
            # Pillow's own conversion clips 16-bit values at 255 (a white image); scale 0..65535
            # to 0..255 instead (the conversion to L clips what falls outside).
            wide = image if image.mode == "I" else image.convert("I")
            return wide.point(lambda value: value / 256).convert("L").convert("RGB")
        if image.mode in _ALPHA_MODES or "transparency" in image.info:
            if image.mode == "La":  # premultiplied; Pillow converts it only to LA
                image = image.convert("LA")
            rgba = image.convert("RGBA")
            flat = Image.new("RGB", rgba.size, _ALPHA_BACKGROUND)
            flat.paste(rgba, mask=rgba.getchannel("A"))
            return flat
        return image if image.mode == "RGB" else image.convert("RGB")
    except (ValueError, OSError) as error:
        raise Skip("unsupported_image_mode", f"{image.mode}: {error}") from None


def _resize(image: Image.Image, scaled: tuple[int, int], options: ImageOptions) -> Image.Image:
    """Resize ``image`` (possibly already draft-reduced) to the output geometry.

    Output sizes are computed from the full-resolution size, so they never depend on how much
    the draft decoder happened to reduce.
    """
    mode, size = options.resize_mode, options.image_size
    if mode == "no":
        return image
    if mode == "center_crop":
        # Crop in source coordinates and resize only the kept region.
        fx, fy = image.width / scaled[0], image.height / scaled[1]
        left, top = (scaled[0] - size) / 2 * fx, (scaled[1] - size) / 2 * fy
        box = (left, top, left + size * fx, top + size * fy)
        return image.resize((size, size), Image.Resampling.BICUBIC, box=box)
    if image.size != scaled:
        image = image.resize(scaled, Image.Resampling.BICUBIC)
    if mode == "border":
        canvas = Image.new("RGB", (size, size), _BORDER_COLOR)
        canvas.paste(image, ((size - scaled[0]) // 2, (size - scaled[1]) // 2))
        return canvas
    return image


def _encode(image: Image.Image, options: ImageOptions) -> bytes:
    buffer = io.BytesIO()
    pil_format = OUTPUT_FORMATS[options.output_format]
    if pil_format == "PNG":
        image.save(buffer, format=pil_format)
    else:
        image.save(buffer, format=pil_format, quality=options.quality)
    return buffer.getvalue()
