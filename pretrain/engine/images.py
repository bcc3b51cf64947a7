"""Decoding images from samples, and the normalisation every encoder of the project is trained
with (OpenAI CLIP's mean and std: pretraining, and the fine-tuning recipes that start from it)."""

from __future__ import annotations

import io
import math
import warnings
from typing import Any

from PIL import Image

from data_tools.shard_writer import IMAGE_EXTENSIONS

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def decode_image(sample: dict[str, Any], draft: tuple[int, int] | None = None) -> Image.Image:
    """The sample's image as RGB; raises on missing or undecodable data (the caller counts it).

    ``draft``: a JPEG is decoded at the smallest of libjpeg's 1/2, 1/4, 1/8 DCT scales that
    still covers ``draft`` (width, height) (``PIL.Image.draft``); other formats, and JPEGs
    already within it, decode at full size."""
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(sample[ext]))
                if draft is not None and image.format == "JPEG":
                    image.draft("RGB", draft)
                image.load()
            return image if image.mode == "RGB" else image.convert("RGB")
    raise KeyError(f"sample {sample.get('__key__')} has no image")


def jpeg_draft_size(image_size: int, scale: tuple[float, float]) -> tuple[int, int]:
    """The least size a training JPEG is decoded at (see :func:`decode_image`).

    RandomResizedCrop takes a crop of ``scale[0]``..``scale[1]`` of the area at an aspect
    ratio of 3/4..4/3, then resizes it to ``image_size``. Its smallest crop has a short side
    of about ``sqrt(scale[0] * 3/4)`` of the image's short side; decoding with both sides at
    least ``image_size / sqrt(scale[0] * 3/4)`` keeps even that crop a downscale (never an
    upscale of fewer pixels than the output has), so the crop is still sampled from at least
    as many pixels as it is resized to. At open_clip's scale (0.9, 1.0) and 224 px that is
    273 px: a 1024x768 JPEG decodes at 1/2 (512x384), about 3x faster, a 256-px one as is.
    At ImageNet-style scale 0.08 it is 915 px, so large images keep (nearly) full size."""
    side = math.ceil(image_size / math.sqrt(scale[0] * 0.75))
    return side, side
