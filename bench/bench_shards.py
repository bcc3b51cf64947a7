"""Throughput of the shard builder against PIL alone doing the same work, in one run.

    python bench/bench_shards.py [--images 1000] [--width 1024 --height 768] [--image-size 256]

Generates realistic JPEGs (smooth photographic structure plus sensor-like noise, about the
file size of a camera photo at that resolution) with captions into a folder, then measures:

* ``pil``: read each file, decode it (JPEG draft mode), convert to RGB, resize to a 256-pixel
  short side (bicubic), encode JPEG at quality 95 -- the per-image work of the builder with
  nothing else (no captions, hashing, tar, metadata, parquet, workers);
* ``pil 2 proc``: the same work in two already-running processes taking files as they free up
  (start-up excluded): what this machine gives two processes, the ceiling for ``builder 2w``;
* ``builder 1w`` and ``builder 2w``: ``data_tools.build.build`` on the folder with the same
  settings, end to end (enumeration, worker start-up, writing shards, sizes.json), 25 samples
  per shard: 40 shards stand in for the thousands of a real build, in which the end of the run
  (one worker finishing the last shard alone) weighs next to nothing.

Each repeat runs the four back to back (``--repeats`` times). Prints the images/s of every run
and their median, and the ratios builder 1w / pil, builder 2w / builder 1w and pil 2 proc / pil,
each as the median over repeats of the ratio within a repeat. The machine should be otherwise
idle: ``pil 2 proc / pil`` well below 2 means another process held a core.
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_tools.build import BuildConfig, build  # noqa: E402
from data_tools.images import ImageOptions  # noqa: E402
from data_tools.samples import SampleOptions  # noqa: E402
from data_tools.sources import SourceSpec  # noqa: E402

STARTS: set[str] = set()  # how the builder started its workers, reported with the results
RATIOS = {
    ("builder 1w", "pil"): "target >= 0.85",
    ("builder 2w", "builder 1w"): "target >= 1.6",
    ("pil 2 proc", "pil"): "this machine's own 2-process scaling (start-up excluded): the ceiling",
}


def photo_like(rng: np.random.Generator, width: int, height: int,
               grain: np.ndarray) -> Image.Image:
    """Smooth large-scale colour structure, mid-scale texture and sensor-like grain.

    ``grain`` is a precomputed noise field a little larger than the image; each image takes it
    at a random offset (drawing fresh Gaussian noise per image would dominate generation time).
    """
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    texture = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    texture = Image.fromarray(texture).resize((width, height), Image.Resampling.BILINEAR)
    blended = np.asarray(Image.blend(image, texture, 0.25), dtype=np.int16)
    dy, dx = rng.integers(0, grain.shape[0] - height), rng.integers(0, grain.shape[1] - width)
    pixels = blended + grain[dy : dy + height, dx : dx + width]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def generate(folder: Path, count: int, width: int, height: int) -> int:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    grain = rng.normal(0, 6, (height + 64, width + 64, 3)).astype(np.int16)
    total = 0
    for index in range(count):
        buffer = io.BytesIO()
        photo_like(rng, width, height, grain).save(buffer, "JPEG", quality=90)
        (folder / f"{index:06d}.jpg").write_bytes(buffer.getvalue())
        (folder / f"{index:06d}.txt").write_text(f"a generated photograph number {index}\n")
        total += len(buffer.getvalue())
    return total


def pil_one(path: Path, image_size: int, quality: int) -> None:
    """The builder's per-image work in plain PIL: read, draft decode, RGB, resize, encode."""
    image = Image.open(io.BytesIO(path.read_bytes()))
    width, height = image.size
    scale = image_size / min(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image.draft("RGB", size)
    image = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    image.save(io.BytesIO(), "JPEG", quality=quality)


def pil_alone(folder: Path, image_size: int, quality: int) -> int:
    paths = sorted(folder.glob("*.jpg"))
    for path in paths:
        pil_one(path, image_size, quality)
    return len(paths)


def pil_two_processes(folder: Path, image_size: int, quality: int) -> float:
    """Images/s of PIL alone in two already-running processes taking files 10 at a time as they
    free up (start-up and warm-up not timed): what two processes get from this machine. The pool
    is gone when this returns, so its threads cannot change how the builder starts workers."""
    paths = sorted(folder.glob("*.jpg"))
    work = partial(pil_one, image_size=image_size, quality=quality)
    with get_context("spawn").Pool(2) as pool:
        pool.map(work, paths[:20], chunksize=10)
        return timed(lambda: len(pool.map(work, paths, chunksize=10)))


def builder(folder: Path, output: Path, workers: int, image_size: int, quality: int) -> int:
    shutil.rmtree(output, ignore_errors=True)
    options = SampleOptions(image=ImageOptions(image_size=image_size, resize_mode="keep_ratio",
                                               quality=quality))
    config = BuildConfig(inputs=(SourceSpec(str(folder)),), output=output, sample=options,
                         samples_per_shard=25, workers=workers, resume=False, progress=False)
    summary = build(config)
    STARTS.add(summary["worker_start"])
    return summary["samples"]


def timed(fn: Callable[[], int]) -> float:
    start = time.perf_counter()
    count = fn()
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--quality", type=int, default=95)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_shards_") as tmp:
        folder = Path(tmp) / "images"
        total = generate(folder, args.images, args.width, args.height)
        print(f"{args.images} JPEGs {args.width}x{args.height}, mean "
              f"{total / args.images / 1024:.0f} KiB, resized to a {args.image_size}-pixel short "
              f"side, JPEG quality {args.quality}")
        pil_alone(folder, args.image_size, args.quality)  # warm the page cache and PIL
        runs: dict[str, list[float]] = {"pil": [], "pil 2 proc": [], "builder 1w": [],
                                        "builder 2w": []}
        for _ in range(args.repeats):
            runs["pil"].append(timed(lambda: pil_alone(folder, args.image_size, args.quality)))
            runs["pil 2 proc"].append(pil_two_processes(folder, args.image_size, args.quality))
            for workers in (1, 2):
                runs[f"builder {workers}w"].append(timed(lambda w=workers: builder(
                    folder, Path(tmp) / "out", w, args.image_size, args.quality)))
        for name, rates in runs.items():
            print(f"{name:>11}: median {statistics.median(rates):6.1f} images/s  (runs: "
                  f"{', '.join(f'{r:.1f}' for r in rates)})")
        print(f"builder workers started by: {', '.join(sorted(STARTS))}")
        for (top, bottom), note in RATIOS.items():
            # Each repeat measures all four back to back, so the per-repeat ratio cancels the
            # slow drifts of a shared machine's speed; the median discards a disturbed repeat.
            ratios = [a / b for a, b in zip(runs[top], runs[bottom], strict=True)]
            print(f"{top + ' / ' + bottom:<23} = {statistics.median(ratios):.2f}  (runs: "
                  f"{', '.join(f'{r:.2f}' for r in ratios)})  {note}")

if __name__ == "__main__":
    main()
