"""Synthetic segmentation data in the ``ADEChallengeData2016`` layout, for the demo and tests.

Each image is a noisy grey background, annotated 0 ("other", ignored under
``reduce_zero_label`` like ADE20K's), with a few rectangles and ellipses of classes 1..K, each
class painted in its own colour (plus noise, and JPEG artefacts). Sizes are drawn so that no
side is a multiple of 32, as with most ADE20K images.

    python -m finetune.segmentation.synthetic OUT --train 200 --val 40 --classes 5
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SPLITS = ("training", "validation")


def class_colours(num_classes: int) -> np.ndarray:
    """Well-separated colours for classes 1..K (index 0: the background's grey)."""
    hues = np.linspace(0, 1, num_classes, endpoint=False)
    colours = [(128, 128, 128)]
    for hue in hues:
        rgb = np.clip(np.abs((hue * 6 + np.array([0, 4, 2])) % 6 - 3) - 1, 0, 1)
        colours.append(tuple(int(40 + 200 * c) for c in rgb))
    return np.array(colours, dtype=np.uint8)


def _size(rng: np.random.Generator, low: int, high: int) -> int:
    while True:
        side = int(rng.integers(low, high + 1))
        if side % 32:
            return side


def synthetic_pair(rng: np.random.Generator, num_classes: int, min_side: int,
                   max_side: int) -> tuple[Image.Image, Image.Image]:
    """One (RGB image, index mask) pair."""
    height, width = _size(rng, min_side, max_side), _size(rng, min_side, max_side)
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(1, 4))):
        label = int(rng.integers(1, num_classes + 1))
        box_w = int(rng.integers(width // 4, width * 3 // 4))
        box_h = int(rng.integers(height // 4, height * 3 // 4))
        left, top = int(rng.integers(0, width - box_w)), int(rng.integers(0, height - box_h))
        shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
        shape([left, top, left + box_w, top + box_h], fill=label)
    labels = np.asarray(mask)
    pixels = class_colours(num_classes)[labels].astype(np.float32)
    pixels += rng.normal(0, 12, size=pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image, mask


def write_synthetic_ade(root: str | Path, train: int, val: int, num_classes: int = 5,
                        seed: int = 0, min_side: int = 40, max_side: int = 90) -> Path:
    """Write ``root/images/{training,validation}/*.jpg`` and ``root/annotations/.../*.png``;
    returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in zip(SPLITS, (train, val), strict=True):
        images, annotations = root / "images" / split, root / "annotations" / split
        images.mkdir(parents=True, exist_ok=True)
        annotations.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image, mask = synthetic_pair(rng, num_classes, min_side, max_side)
            name = f"ADE_{split[:5]}_{index:08d}"
            image.save(images / f"{name}.jpg", quality=92)
            mask.save(annotations / f"{name}.png")
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--val", type=int, default=40)
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_synthetic_ade(args.out, args.train, args.val, args.classes, args.seed)
    print(f"wrote {args.train} training and {args.val} validation images to {args.out}")


if __name__ == "__main__":
    main()
