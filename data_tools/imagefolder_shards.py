"""Turn an ImageFolder split (ImageNet's ``train/<wnid>/*.JPEG``) into labelled shards.

    python -m data_tools.imagefolder_shards --input /data/imagenet/train \
        --output /data/imagenet-shards/train --workers 16
    python -m data_tools.imagefolder_shards --input /data/imagenet/val \
        --output /data/imagenet-shards/val --classes-from /data/imagenet-shards/train --no-shuffle

Each sample's ``.json`` holds ``cls`` (class index) and ``wnid``; ``classes.json`` beside the
shards lists the classes. Fine-tune from them with ``data.layout: shards``, ``data.label_key:
cls``. Re-running after an interruption keeps the shards already complete.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

from data_tools.cli import OneLineParser, fail
from data_tools.imagefolder import imagefolder_to_shards, read_classes


def main(argv: list[str] | None = None) -> int:
    prog = "python -m data_tools.imagefolder_shards"
    parser = OneLineParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, required=True, help="ImageFolder root")
    parser.add_argument("--output", type=Path, required=True, help="folder for the shards")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle across shards")
    parser.add_argument("--no-shuffle", action="store_true",
                        help="keep the folder order (validation splits)")
    parser.add_argument("--classes-from", type=Path, default=None,
                        help="shard folder whose classes.json fixes the class order (give the "
                             "training shards when converting the validation split)")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    if not 1 <= args.samples_per_shard <= 9999:
        fail(prog, "--samples-per-shard must be in 1..9999")
    try:
        classes = read_classes(args.classes_from) if args.classes_from else None
        with tqdm(unit="image", disable=not sys.stderr.isatty()) as bar:
            summary = imagefolder_to_shards(
                args.input, args.output, args.samples_per_shard,
                shuffle_seed=None if args.no_shuffle else args.seed, classes=classes,
                workers=max(1, args.workers), progress=bar.update)
    except (FileNotFoundError, ValueError) as error:
        fail(prog, str(error))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
