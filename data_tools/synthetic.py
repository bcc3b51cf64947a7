"""Deterministic synthetic image-caption data: coloured shapes on coloured backgrounds.

The demo and the tests need data that exists on any machine without a download and that a
small model can learn in minutes on a CPU. Each image holds one shape of one colour on a
background of another colour; its caption says so ("a red triangle on a blue background") and
its metadata carries the labels (``color``, ``shape``, ``background``) for zero-shot and
fine-tuning evaluation. The same seed always gives the same bytes.

    python -m data_tools.synthetic --output data/train --num-samples 4096 --seed 0
"""

from __future__ import annotations

import argparse
import io
import math
import random
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from data_tools.shard_writer import Sample, shard_pattern, write_shard, write_sizes

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {color} {shape} on a {background} background",
    "a picture of a {color} {shape} over {background}",
    "{color} {shape}, {background} backdrop",
    "a small drawing of a {shape} coloured {color} on {background}",
    # Captions that leave the shape's colour out make the shape itself worth encoding: with
    # colour in every caption, the colour pair alone tells most captions of a batch apart.
    "a {shape} on a {background} background",
    "a {shape}",
)


def caption_for(color: str, shape: str, background: str, template: int = 0) -> str:
    return CAPTION_TEMPLATES[template].format(color=color, shape=shape, background=background)


def zero_shot_prompts(attribute: str) -> tuple[list[str], list[str]]:
    """Class names and prompt templates ("{}" = the class) for zero-shot ``color`` or ``shape``.

    The templates are the training captions' phrasing with every other attribute filled in (a
    prompt ensemble, like OpenAI's ImageNet templates)."""
    if attribute == "color":
        templates = [caption_for("{}", shape, background)
                     for shape in SHAPES for background in COLORS]
        return list(COLORS), templates
    if attribute == "shape":
        templates = [caption_for(color, "{}", background)
                     for color in COLORS for background in COLORS if background != color]
        return list(SHAPES), templates
    raise ValueError(f"unknown attribute {attribute!r}: expected 'color' or 'shape'")


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 18) -> tuple[int, ...]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple]:
    corners = {"square": 4, "triangle": 3}[shape]
    offset = math.pi / 4 if shape == "square" else -math.pi / 2
    return [
        (cx + r * math.cos(offset + angle + 2 * math.pi * k / corners),
         cy + r * math.sin(offset + angle + 2 * math.pi * k / corners))
        for k in range(corners)
    ]


def render(color: str, shape: str, background: str, size: int, rng: random.Random) -> Image.Image:
    """Draw one shape with random position, size and rotation; colours jittered slightly."""
    image = Image.new("RGB", (size, size), _jitter(COLORS[background], rng))
    draw = ImageDraw.Draw(image)
    radius = rng.uniform(0.28, 0.42) * size
    cx = rng.uniform(radius, size - radius)
    cy = rng.uniform(radius, size - radius)
    fill = _jitter(COLORS[color], rng)
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    else:
        angle = rng.uniform(-0.3, 0.3)
        draw.polygon(_shape_points(shape, cx, cy, radius, angle), fill=fill)
    return image


def generate(num_samples: int, seed: int, image_size: int = 64) -> Iterator[Sample]:
    """Yield ``num_samples`` encoded samples, deterministically from ``seed``."""
    rng = random.Random(seed)
    names = list(COLORS)
    for index in range(num_samples):
        color, background = rng.sample(names, 2)
        shape = rng.choice(SHAPES)
        image = render(color, shape, background, image_size, rng)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=92)
        caption = caption_for(color, shape, background, rng.randrange(len(CAPTION_TEMPLATES)))
        meta = {
            "color": color,
            "shape": shape,
            "background": background,
            "source_id": f"synthetic-{seed}-{index}",
            "width": image_size,
            "height": image_size,
        }
        yield Sample(image=buffer.getvalue(), caption=caption, meta=meta)


def write_synthetic_shards(
    output: Path | str,
    num_samples: int,
    seed: int,
    image_size: int = 64,
    samples_per_shard: int = 512,
    progress: bool = True,
) -> str:
    """Write a synthetic split as shards and return the brace pattern naming them."""
    output = Path(output)
    samples = generate(num_samples, seed, image_size)
    num_shards = math.ceil(num_samples / samples_per_shard)
    bar = tqdm(total=num_samples, desc=f"synthetic {output.name}", unit="img", disable=not progress)
    for shard_index in range(num_shards):
        count = min(samples_per_shard, num_samples - shard_index * samples_per_shard)
        batch = [next(samples) for _ in range(count)]
        write_shard(output, shard_index, batch)
        bar.update(count)
    bar.close()
    write_sizes(output)
    return shard_pattern(output, num_shards)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, type=Path, help="directory for the shards")
    parser.add_argument("--num-samples", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0, help="different seeds give disjoint draws")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--samples-per-shard", type=int, default=512)
    args = parser.parse_args(argv)
    if args.num_samples < 1 or args.image_size < 16 or args.samples_per_shard < 1:
        parser.error("--num-samples and --samples-per-shard must be >= 1, --image-size >= 16")
    pattern = write_synthetic_shards(
        args.output, args.num_samples, args.seed, args.image_size, args.samples_per_shard
    )
    print(pattern)


if __name__ == "__main__":
    main()
