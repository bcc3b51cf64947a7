"""Validation splits read once, in parallel: every sample of a shard pattern (or of any listed
split, such as an image folder) exactly once across all ranks and their loader workers.

Sample ``i`` of the split (in shard order) belongs to slot ``i mod (ranks x workers)``, slot
``rank x workers + worker``: slices differ by at most one sample per slot, whatever the number of
shards, and nothing is decoded twice (other slots' samples are skipped as raw bytes). Samples
that do not decode are skipped and counted; each worker's last batch carries its count under
``"skipped"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.engine.shard_stream import ordered_dataset


class SlicedSplit(IterableDataset):
    """This rank's batches of a split; see the module docstring.

    ``decode(sample)`` returns one item (raising on bad data); ``collate(items)`` makes a batch
    dict of them.
    """

    def __init__(self, pattern: str | Callable[[], Iterable[Any]],
                 decode: Callable[[Any], Any], collate: Callable[[list[Any]], dict[str, Any]],
                 batch_size: int, rank: int, world_size: int, limit: int | None = None) -> None:
        super().__init__()
        self.pattern = pattern  # shards, or a function listing the split's items in order
        self.limit = limit  # only the first ``limit`` items of the split
        self.decode, self.collate = decode, collate
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slot, slots = self.rank * workers + worker, self.world_size * workers
        items: list[Any] = []
        pending: dict[str, Any] | None = None
        skipped = 0
        source = (ordered_dataset(self.pattern) if isinstance(self.pattern, str)
                  else self.pattern())
        for index, sample in enumerate(source):
            if self.limit is not None and index >= self.limit:
                break
            if index % slots != slot:
                continue
            try:
                items.append(self.decode(sample))
            except Exception:  # an unreadable sample is counted, never fatal
                skipped += 1
                continue
            if len(items) == self.batch_size:
                # held back one batch: the last one carries the slice's count of skipped
                # samples, including any met after the last full batch
                if pending is not None:
                    yield {**pending, "skipped": 0}
                pending, items = self.collate(items), []
        if items:
            if pending is not None:
                yield {**pending, "skipped": 0}
            pending = self.collate(items)
        if pending is not None:
            yield {**pending, "skipped": skipped}
        elif skipped:
            print(f"rank {self.rank} worker {worker}: {skipped} validation samples could not be "
                  "decoded, and no sample of this slice could", flush=True)


def sliced_loader(split: SlicedSplit, workers: int) -> DataLoader:
    """The split through a DataLoader (pinned batches on GPU machines)."""
    return DataLoader(split, batch_size=None, num_workers=workers,
                      pin_memory=torch.cuda.is_available(),
                      prefetch_factor=2 if workers else None)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def image_folder(root: str | Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """The classes (sorted sub-folder names, e.g. ImageNet wnids) of an ImageFolder tree and
    its images as ``(path, class index)`` in a fixed order; raises naming the folder when it has
    no class folder or no image."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such image folder: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    items = [(path, index) for index, name in enumerate(classes)
             for path in sorted((root / name).rglob("*"))
             if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()]
    if not classes or not items:
        raise ValueError(f"{root}: expected one sub-folder of images per class, found "
                         f"{len(classes)} folders and {len(items)} images")
    return classes, items
