"""Training-stream throughput per data worker: this pipeline's loader against open_clip's.

    python bench/bench_loader.py [--workers 1] [--batches 8] [--skip 2] [--repeats 3]

Shards of 1024x768 JPEGs (quality 90, a coloured shape with Gaussian grain, ~200 KB each, about
a web photo's size and decode cost; 64 distinct images cycled over the shards), read at 224 px
with the same open_clip training transform (RandomResizedCrop scale 0.9-1, bicubic, OpenAI
normalisation) and the same tokenizer, batch 64, one worker by default, each loader in its
own DataLoader:

* ``ours``: ``pretrain.data.build_train_loader`` as pretraining runs it (shard draw, shuffle
  buffer, per-sample seeded augmentation, resumable positions), with its default JPEG draft
  decode (``data.jpeg_draft``), and ``ours-nodraft`` with it off, to show what it is worth;
* ``open_clip``: ``open_clip_train.data.get_wds_dataset`` (its webdataset pipeline: shard
  shuffle, sample shuffle, ``decode("pilrgb")``, map, batch), imported through the same
  compatibility patches the peer benchmark uses (``bench_open_clip_peer.patch_open_clip_train``).

The first ``--skip`` batches (worker start-up, shuffle buffer fill) are not timed; the variants
run ``--repeats`` times interleaved, and the ratios are medians of per-repeat ratios.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_open_clip_peer import patch_open_clip_train  # noqa: E402

from data_tools.mixture import load_mixture  # noqa: E402
from data_tools.shard_writer import Sample, shard_pattern, write_shard, write_sizes  # noqa: E402
from data_tools.synthetic import COLORS, SHAPES, caption_for, render  # noqa: E402
from pretrain.engine.threads import apply_thread_policy  # noqa: E402

WIDTH, HEIGHT = 1024, 768


def large_jpeg_shards(root: Path, samples: int, per_shard: int, seed: int = 0) -> str:
    import random

    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    names = list(COLORS)
    encoded = []
    for _ in range(64):
        color, background = rng.sample(names, 2)
        shape = rng.choice(SHAPES)
        image = render(color, shape, background, WIDTH, rng).crop((0, 0, WIDTH, HEIGHT))
        pixels = np.asarray(image, dtype=np.int16)
        pixels = pixels + noise.normal(0, 14, pixels.shape).astype(np.int16)
        buffer = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        encoded.append((buffer.getvalue(), caption_for(color, shape, background)))
    shards = (samples + per_shard - 1) // per_shard
    for shard in range(shards):
        batch = []
        for i in range(per_shard):
            data, caption = encoded[(shard * per_shard + i) % len(encoded)]
            batch.append(Sample(image=data, caption=caption,
                                meta={"width": WIDTH, "height": HEIGHT}))
        write_shard(root, shard, batch)
    write_sizes(root)
    return shard_pattern(root, shards)


def time_batches(iterator, batches: int, skip: int, batch_size: int) -> float:  # noqa: ANN001
    for _ in range(skip):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
        assert len(batch["image"] if isinstance(batch, dict) else batch[0]) == batch_size
    return batches * batch_size / (time.perf_counter() - start)


def run_ours(pattern: str, args: argparse.Namespace, draft: bool) -> float:
    from pretrain.clip_model import build_tokenizer
    from pretrain.data import build_train_loader

    loader = build_train_loader(
        shard_sets=load_mixture(pattern), tokenize=build_tokenizer(77), image_size=224,
        batch_size=args.batch, num_workers=args.workers, seed=0, rank=0, shuffle_buffer=1000,
        shuffle_initial=200, scale=(0.9, 1.0), jpeg_draft=draft)
    try:
        return time_batches(loader, args.batches, args.skip, args.batch)
    finally:
        loader.close()


def run_open_clip(pattern: str, args: argparse.Namespace, samples: int) -> float:
    patch_open_clip_train()
    from open_clip import get_tokenizer
    from open_clip.transform import AugmentationCfg, image_transform
    from open_clip_train.data import get_wds_dataset

    from pretrain.engine.images import OPENAI_MEAN, OPENAI_STD

    transform = image_transform(224, is_train=True, mean=OPENAI_MEAN, std=OPENAI_STD,
                                aug_cfg=AugmentationCfg(scale=(0.9, 1.0)))
    options = argparse.Namespace(
        train_data=pattern, val_data=None, train_num_samples=samples, val_num_samples=None,
        dataset_resampled=False, train_data_upsampling_factors=None, batch_size=args.batch,
        workers=args.workers, world_size=1, rank=0, seed=0)
    info = get_wds_dataset(options, transform, is_train=True, epoch=0,
                           tokenizer=get_tokenizer("RN50"))
    iterator = iter(info.dataloader)
    try:
        return time_batches(iterator, args.batches, args.skip, args.batch)
    finally:
        del iterator


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per loader")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8, help="timed batches per run")
    parser.add_argument("--skip", type=int, default=2, help="leading batches not timed")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    apply_thread_policy(log=None)  # as the entry points do; the workers run one thread each
    samples = (args.batches + args.skip + 2) * args.batch * max(1, args.workers)
    rates: dict[str, list[float]] = {"ours": [], "ours-nodraft": [], "open_clip": []}
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        # open_clip's webdataset splits shards over workers without replacement: enough for one
        # pass of every worker; ours draws shards with replacement, so the same set serves it.
        pattern = large_jpeg_shards(Path(tmp) / "shards", samples, per_shard=args.batch)
        size = sum(f.stat().st_size for f in (Path(tmp) / "shards").glob("*.tar"))
        runs = [("ours", lambda: run_ours(pattern, args, True)),
                ("ours-nodraft", lambda: run_ours(pattern, args, False)),
                ("open_clip", lambda: run_open_clip(pattern, args, samples))]
        for repeat in range(args.repeats):
            for name, run in runs if repeat % 2 == 0 else runs[::-1]:
                rates[name].append(run())
                print(f"  repeat {repeat} {name:<13}{rates[name][-1]:7.1f} samples/s", flush=True)
    load = os.getloadavg()
    print(f"{WIDTH}x{HEIGHT} JPEGs (~{size / samples / 1e3:.0f} KB each) -> 224 px, batch "
          f"{args.batch}, {args.workers} worker(s), {args.batches} batches timed after "
          f"{args.skip}, {args.repeats} interleaved repeats; load average now "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    per_worker = max(1, args.workers)
    for name, values in rates.items():
        print(f"{name:<13} median {statistics.median(values):7.1f} samples/s, "
              f"{statistics.median(values) / per_worker:6.1f} per worker  "
              f"(runs: {', '.join(f'{v:.1f}' for v in values)})")
    for name in ("ours", "ours-nodraft"):
        ratios = [a / b for a, b in zip(rates[name], rates["open_clip"], strict=True)]
        print(f"ratio {name} / open_clip, median {statistics.median(ratios):.2f}  "
              f"(runs: {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
