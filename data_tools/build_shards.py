"""Build WebDataset shards (img2dataset layout) from image-caption collections.

    python -m data_tools.build_shards --input photos/ --input captions.csv \\
        --output shards/ --image-size 256 --resize-mode keep_ratio --workers 4

Inputs (detected from the path, or forced with --input-format): a folder of images with
sidecar ``.txt`` captions; a manifest (.csv .tsv .parquet .jsonl) with an image-path and a
caption column; a COCO-captions JSON; existing WebDataset shards (a tar, a folder of tars, a
brace pattern). Bad samples are skipped and counted by reason; only a bad invocation exits
non-zero. See docs/data_tools.md.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from data_tools.build import BuildConfig, build
from data_tools.cli import OneLineParser, fail
from data_tools.images import DEFAULT_MAX_PIXELS, OUTPUT_FORMATS, RESIZE_MODES, ImageOptions
from data_tools.samples import DEFAULT_MAX_FILE_BYTES, SampleOptions
from data_tools.shard_writer import MAX_SAMPLES_PER_SHARD
from data_tools.skips import REASONS
from data_tools.sources import COCO_MODES, KINDS, InvocationError, SourceSpec

PROG = "build_shards"


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = p.add_argument_group("inputs and output")
    io.add_argument("--input", action="append", required=True, metavar="SRC",
                    help="folder, manifest, COCO JSON or shards; repeat for several")
    io.add_argument("--input-format", action="append", choices=("auto", *KINDS),
                    help="force the kind: once for all inputs, or once per --input")
    io.add_argument("--output", required=True, type=Path, help="directory for the shards")
    io.add_argument("--image-column", help="manifest column with image paths (auto-detected)")
    io.add_argument("--caption-column", help="manifest column with captions (auto-detected)")
    io.add_argument("--data-root", help="folder that manifest/COCO image paths resolve against "
                    "and must stay inside (default: the manifest's or JSON's folder)")
    io.add_argument("--coco-mode", choices=COCO_MODES, default="per-image",
                    help="one sample per image (all captions in .json) or one per caption")
    shards = p.add_argument_group("shards")
    shards.add_argument("--samples-per-shard", type=int, default=MAX_SAMPLES_PER_SHARD,
                        help=f"input items per shard (at most {MAX_SAMPLES_PER_SHARD})")
    shards.add_argument("--workers", type=int, default=1,
                        help="processes, each writing whole shards")
    shards.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse complete shards of the same build, rebuild partial ones")
    shards.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="show a progress bar with images/s")
    images = p.add_argument_group("images")
    images.add_argument("--image-size", type=int, default=256)
    images.add_argument("--resize-mode", choices=RESIZE_MODES, default="keep_ratio")
    images.add_argument("--output-format", choices=tuple(OUTPUT_FORMATS), default="jpg")
    images.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality")
    images.add_argument("--min-image-size", type=int, default=0,
                        help="skip images whose smaller side is below this")
    images.add_argument("--max-aspect-ratio", type=float, default=math.inf,
                        help="skip images whose long side / short side exceeds this")
    images.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="skip images with more pixels (decompression bombs)")
    images.add_argument("--max-file-bytes", type=int, default=DEFAULT_MAX_FILE_BYTES,
                        help="skip image files larger than this")
    captions = p.add_argument_group("captions")
    captions.add_argument("--min-caption-length", type=int, default=1,
                          help="skip captions shorter than this (characters, after cleaning)")
    captions.add_argument("--dedup", action="store_true",
                          help="skip samples whose image bytes an earlier sample holds")
    return p


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    formats = args.input_format or ["auto"]
    if len(formats) not in (1, len(args.input)):
        raise InvocationError("give --input-format once, or once per --input")
    if len(formats) == 1:
        formats = formats * len(args.input)
    specs = tuple(
        SourceSpec(path=path, kind=kind, image_column=args.image_column,
                   caption_column=args.caption_column, data_root=args.data_root,
                   coco_mode=args.coco_mode)
        for path, kind in zip(args.input, formats, strict=True)
    )
    try:
        image = ImageOptions(
            image_size=args.image_size, resize_mode=args.resize_mode,
            output_format=args.output_format, quality=args.quality,
            min_image_size=args.min_image_size, max_aspect_ratio=args.max_aspect_ratio,
            max_pixels=args.max_pixels,
        )
    except ValueError as error:
        raise InvocationError(str(error)) from None
    if args.max_file_bytes < 1:
        raise InvocationError("--max-file-bytes must be >= 1")
    sample = SampleOptions(image=image, min_caption_length=args.min_caption_length,
                           max_file_bytes=args.max_file_bytes)
    return BuildConfig(inputs=specs, output=args.output, samples_per_shard=args.samples_per_shard,
                       sample=sample, dedup=args.dedup, workers=args.workers,
                       resume=args.resume, progress=args.progress)


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"wrote {summary['samples']} samples in {summary['shards']} shards to "
        f"{summary['output']} ({summary['resumed_shards']} shards resumed)",
        f"input items: {summary['input_items']}, skipped: {sum(summary['skipped'].values())}; "
        f"this run processed {summary['built_items']} items in {summary['elapsed_seconds']:.1f} s "
        f"({summary['items_per_second']} items/s)",
    ]
    for reason, count in summary["skipped"].items():
        lines.append(f"  skipped {reason}: {count} ({REASONS[reason]})")
    if summary["pattern"]:
        lines.append(f"shards: {summary['pattern']}")
    if summary["stale_shards"]:
        stale = summary["stale_shards"]
        lines.append(f"warning: {len(stale)} shards of an earlier, larger build remain in the "
                     f"output (first: {stale[0]}); they are not listed in sizes.json")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        summary = build(config_from_args(args))
    except InvocationError as error:
        fail(PROG, str(error), status=2)
    except OSError as error:  # e.g. the disk filled up while writing a shard
        fail(PROG, f"{error} (re-run to resume)", status=1)
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
