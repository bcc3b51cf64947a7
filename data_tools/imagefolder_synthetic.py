"""A small generated ImageFolder in ImageNet's layout, for tests, demos and trying the commands:
``<root>/<wnid>/<wnid>_<n>.JPEG``, one class per colour of the synthetic shapes (real ImageNet-1K
wnids, so class names resolve), optionally with a corrupt file and a PNG named ``.JPEG`` (both
occur in ImageNet's train split)."""

from __future__ import annotations

import random
from pathlib import Path

from data_tools.synthetic import COLORS, SHAPES, render

# ImageNet-1K wnids (timm's imagenet_synsets.txt), one per colour class
WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331",
         "n01498041", "n01514668")


def write_synthetic_imagefolder(root: Path | str, num_classes: int, per_class: int, seed: int,
                                image_size: int = 48, corrupt: int = 0,
                                png_named_jpeg: int = 0) -> list[str]:
    """Write the folder and return its wnids (class index order). The shape's colour is the
    class; shape and background vary. ``corrupt`` files of the first class hold truncated JPEG
    bytes; ``png_named_jpeg`` images of the second class are PNG data with a ``.JPEG`` name."""
    if not 2 <= num_classes <= len(WNIDS):
        raise ValueError(f"num_classes must be in 2..{len(WNIDS)}")
    root = Path(root)
    rng = random.Random(seed)
    colors = list(COLORS)[:num_classes]
    wnids = list(WNIDS[:num_classes])
    for wnid, color in zip(wnids, colors, strict=True):
        folder = root / wnid
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            background = rng.choice([c for c in COLORS if c != color])
            image = render(color, rng.choice(SHAPES), background, image_size, rng)
            image.save(folder / f"{wnid}_{n}.JPEG", format="JPEG", quality=90)
    for n in range(corrupt):
        path = root / wnids[0] / f"{wnids[0]}_corrupt{n}.JPEG"
        data = (root / wnids[0] / f"{wnids[0]}_0.JPEG").read_bytes()
        path.write_bytes(data[: len(data) // 3])
    for n in range(png_named_jpeg):
        image = render(colors[1], SHAPES[0], colors[0], image_size, rng)
        image.save(root / wnids[1] / f"{wnids[1]}_png{n}.JPEG", format="PNG")
    return wnids
