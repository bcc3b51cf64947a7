"""A small generated COCO in the real layout, for tests, demos and trying the detection code
without the 20 GB download:

    <out>/annotations/instances_train2017.json, instances_val2017.json
    <out>/train2017/<id:012d>.jpg, <out>/val2017/<id:012d>.jpg

It has what real COCO makes the code handle: images of varying size and aspect (portrait and
landscape), category ids with gaps (3 "square", 17 "disc", 42 "triangle", and 60 "star",
declared with no instance), objects as polygons (some split into two separate parts),
crowd regions (``iscrowd=1``, RLE with ``counts`` as the uncompressed list, as COCO writes
them), images with no annotation at all and, in train, one image with only a crowd region.
Each category has its own colour on a grey noise background, so a small detector can learn
it in minutes; objects never overlap, so every polygon is exactly what is visible. The same
seed writes the same files.

    python -m data_tools.coco_synthetic --out data/coco_synthetic --train 48 --val 16
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image, ImageDraw

from data_tools.cli import OneLineParser
from data_tools.files import atomic_write, atomic_write_text

CATEGORIES: tuple[dict[str, Any], ...] = (
    {"id": 3, "name": "square", "supercategory": "shape", "color": (220, 40, 40)},
    {"id": 17, "name": "disc", "supercategory": "shape", "color": (40, 170, 60)},
    {"id": 42, "name": "triangle", "supercategory": "shape", "color": (40, 70, 220)},
    {"id": 60, "name": "star", "supercategory": "shape", "color": (235, 215, 40)},  # unused
)
DRAWN = CATEGORIES[:3]
SPLITS = ("train2017", "val2017")
SPLIT_PROBABILITY = 0.3  # an object cut into two separate parts
EMPTY_EVERY = 8  # image i with i % 8 == 5 has no annotation
CROWD_EVERY = 6  # image i with i % 6 == 3 also holds a crowd region
Polygon = list[tuple[float, float]]


def _clip(polygon: Polygon, x: float, keep_left: bool) -> Polygon:
    """The part of a convex polygon left (or right) of the vertical line at ``x``
    (Sutherland-Hodgman against one half-plane)."""
    def inside(p: tuple[float, float]) -> bool:
        return p[0] <= x if keep_left else p[0] >= x

    clipped: Polygon = []
    for a, b in zip(polygon, polygon[1:] + polygon[:1], strict=True):
        if inside(a):
            clipped.append(a)
        if inside(a) != inside(b):
            t = (x - a[0]) / (b[0] - a[0])
            clipped.append((x, a[1] + t * (b[1] - a[1])))
    return clipped


def _shape(name: str, x: float, y: float, size: float) -> Polygon:
    if name == "square":
        return [(x, y), (x + size, y), (x + size, y + size), (x, y + size)]
    if name == "triangle":
        return [(x + size / 2, y), (x + size, y + size), (x, y + size)]
    r = size / 2
    return [(x + r + r * math.cos(2 * math.pi * k / 24), y + r + r * math.sin(2 * math.pi * k / 24))
            for k in range(24)]


def _parts(name: str, x: float, y: float, size: float, rng: random.Random) -> list[Polygon]:
    """The object's polygon, or with probability ``SPLIT_PROBABILITY`` its two pieces left
    and right of a vertical gap of background (a COCO object of several parts)."""
    polygon = _shape(name, x, y, size)
    if rng.random() >= SPLIT_PROBABILITY:
        return [polygon]
    cut, gap = x + size * rng.uniform(0.35, 0.65), max(2.0, size / 8)
    return [_clip(polygon, cut - gap / 2, True), _clip(polygon, cut + gap / 2, False)]


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE of a binary (H, W) mask: run lengths in column-major order,
    starting with a (possibly empty) run of zeros."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def _free(box: tuple[float, float, float, float], taken: list[tuple[float, ...]]) -> bool:
    x1, y1, x2, y2 = box
    margin = 3
    return all(x2 + margin <= a1 or a2 + margin <= x1 or y2 + margin <= b1 or b2 + margin <= y1
               for a1, b1, a2, b2 in taken)


def _place(size: float, height: int, width: int, taken: list[tuple[float, ...]],
           rng: random.Random) -> tuple[float, float] | None:
    for _ in range(50):
        x, y = rng.uniform(1, width - size - 1), rng.uniform(1, height - size - 1)
        if _free((x, y, x + size, y + size), taken):
            taken.append((x, y, x + size, y + size))
            return x, y
    return None


def _crowd(image: Image.Image, taken: list[tuple[float, ...]], rng: random.Random
           ) -> tuple[dict[str, Any], np.ndarray] | None:
    """A cluster of small dots of one category drawn on ``image``: (category, mask)."""
    height, width = image.height, image.width
    extent = min(height, width) // 3
    corner = _place(extent, height, width, taken, rng)
    if corner is None:
        return None
    category = rng.choice(DRAWN)
    region = Image.new("L", image.size, 0)
    for _ in range(rng.randint(5, 9)):
        r = rng.uniform(2, 4)
        cx = corner[0] + rng.uniform(r, extent - r)
        cy = corner[1] + rng.uniform(r, extent - r)
        ImageDraw.Draw(region).ellipse((cx - r, cy - r, cx + r, cy + r), fill=1)
    image.paste(category["color"], mask=region.point(lambda v: 255 * v))
    return category, np.asarray(region, dtype=np.uint8)


def _annotate_image(image_id: int, kind: str, height: int, width: int, rng: random.Random,
                    noise: np.random.Generator, next_id: list[int]
                    ) -> tuple[Image.Image, list[dict[str, Any]]]:
    """One image and its annotations; ``kind`` is "objects", "objects+crowd", "crowd" or
    "empty"."""
    pixels = noise.integers(90, 171, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    annotations: list[dict[str, Any]] = []
    taken: list[tuple[float, ...]] = []

    def add(category: dict[str, Any], fields: dict[str, Any]) -> None:
        annotations.append({"id": next_id[0], "image_id": image_id,
                            "category_id": category["id"], **fields})
        next_id[0] += 1

    if kind.startswith("objects"):
        short = min(height, width)
        for _ in range(rng.randint(1, 4)):
            category, size = rng.choice(DRAWN), rng.uniform(max(12, short / 8), short / 3)
            corner = _place(size, height, width, taken, rng)
            if corner is None:
                continue
            parts = _parts(category["name"], *corner, size, rng)
            for part in parts:
                draw.polygon(part, fill=category["color"])
            flat = [[round(v, 2) for point in part for v in point] for part in parts]
            xs = [v for part in flat for v in part[0::2]]
            ys = [v for part in flat for v in part[1::2]]
            rle = mask_utils.merge(mask_utils.frPyObjects(flat, height, width))
            add(category, {"segmentation": flat, "area": float(mask_utils.area(rle)),
                           "bbox": [min(xs), min(ys), round(max(xs) - min(xs), 2),
                                    round(max(ys) - min(ys), 2)], "iscrowd": 0})
    if kind in ("objects+crowd", "crowd"):
        crowd = _crowd(image, taken, rng)
        if crowd is not None:
            category, mask = crowd
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            add(category, {"segmentation": uncompressed_rle(mask), "area": float(mask.sum()),
                           "bbox": [float(cols[0]), float(rows[0]),
                                    float(cols[-1] + 1 - cols[0]),
                                    float(rows[-1] + 1 - rows[0])], "iscrowd": 1})
    return image, annotations


def _kind(split: str, i: int) -> str:
    if split == "train2017" and i == 2:
        return "crowd"
    if i % EMPTY_EVERY == 5:
        return "empty"
    return "objects+crowd" if i % CROWD_EVERY == 3 else "objects"


def _write_split(out_dir: Path, split: str, count: int, seed: int, min_size: int,
                 max_size: int) -> None:
    rng = random.Random(f"coco-synthetic-{seed}-{split}")
    noise = np.random.default_rng([seed % 2**32, SPLITS.index(split)])
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    first_id = 1 if split == "train2017" else 500_001
    images, annotations, next_id = [], [], [first_id * 10]
    for i in range(count):
        image_id = first_id + 3 * i  # ids with gaps, as COCO's
        long_side = rng.randint(min_size, max_size)
        short_side = rng.randint(min_size, long_side)
        height, width = (long_side, short_side) if i % 2 else (short_side, long_side)
        image, objects = _annotate_image(image_id, _kind(split, i), height, width, rng, noise,
                                         next_id)
        file_name = f"{image_id:012d}.jpg"
        atomic_write(out_dir / split / file_name,
                     lambda tmp, im=image: im.save(tmp, format="JPEG", quality=92))
        images.append({"id": image_id, "file_name": file_name, "height": height,
                       "width": width, "license": 1})
        annotations += objects
    dataset = {
        "info": {"description": "synthetic COCO-layout shapes", "version": "1.0"},
        "licenses": [{"id": 1, "name": "CC0"}],
        "images": images, "annotations": annotations,
        "categories": [{k: c[k] for k in ("id", "name", "supercategory")} for c in CATEGORIES],
    }
    atomic_write_text(out_dir / "annotations" / f"instances_{split}.json", json.dumps(dataset))


def write_synthetic_coco(out_dir: str | Path, train_images: int = 48, val_images: int = 16,
                         seed: int = 0, min_size: int = 96, max_size: int = 160) -> Path:
    """Write the dataset (module docstring) under ``out_dir`` and return ``out_dir``."""
    if not 0 < min_size <= max_size:
        raise ValueError(f"need 0 < min_size <= max_size, got {min_size} and {max_size}")
    if min_size < 48:
        raise ValueError(f"min_size {min_size} is too small for objects of 12+ pixels")
    out_dir = Path(out_dir)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    for split, count in zip(SPLITS, (train_images, val_images), strict=True):
        _write_split(out_dir, split, count, seed, min_size, max_size)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="python -m data_tools.coco_synthetic",
                           description="Write a small synthetic COCO (instances json + JPEGs).")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--train", type=int, default=48, help="training images")
    parser.add_argument("--val", type=int, default=16, help="validation images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-size", type=int, default=96, help="shortest image side")
    parser.add_argument("--max-size", type=int, default=160, help="longest image side")
    args = parser.parse_args(argv)
    if args.train < 1 or args.val < 1:
        parser.error("--train and --val must be at least 1")
    try:
        write_synthetic_coco(args.out, args.train, args.val, args.seed, args.min_size,
                             args.max_size)
    except ValueError as error:
        parser.error(str(error))
    for split in SPLITS:
        data = json.loads((args.out / "annotations" / f"instances_{split}.json").read_text())
        crowd = sum(a["iscrowd"] for a in data["annotations"])
        print(f"{args.out / split}: {len(data['images'])} images, "
              f"{len(data['annotations']) - crowd} objects, {crowd} crowd regions; "
              f"{args.out / 'annotations' / f'instances_{split}.json'}")


if __name__ == "__main__":
    main()
