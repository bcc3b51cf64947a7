"""Validation splits read once, in parallel: every sample of a shard pattern exactly once across
all ranks and their loader workers.

Sample ``i`` of the split (in shard order) belongs to slot ``i mod (ranks x workers)``, slot
``rank x workers + worker``: slices differ by at most one sample per slot, whatever the number of
shards, and nothing is decoded twice (other slots' samples are skipped as raw bytes). Samples
that do not decode are skipped and counted; each worker's last batch carries its count under
``"skipped"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.data import ordered_dataset


class SlicedSplit(IterableDataset):
    """This rank's batches of a split; see the module docstring.

    ``decode(sample)`` returns one item (raising on bad data); ``collate(items)`` makes a batch
    dict of them.
    """

    def __init__(self, pattern: str, decode: Callable[[dict[str, Any]], Any],
                 collate: Callable[[list[Any]], dict[str, Any]], batch_size: int, rank: int,
                 world_size: int) -> None:
        super().__init__()
        self.pattern = pattern
        self.decode, self.collate = decode, collate
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slot, slots = self.rank * workers + worker, self.world_size * workers
        items: list[Any] = []
        skipped = 0
        for index, sample in enumerate(ordered_dataset(self.pattern)):
            if index % slots != slot:
                continue
            try:
                items.append(self.decode(sample))
            except Exception:  # an unreadable sample is counted, never fatal
                skipped += 1
                continue
            if len(items) == self.batch_size:
                yield {**self.collate(items), "skipped": 0}
                items = []
        if items:
            yield {**self.collate(items), "skipped": skipped}
        elif skipped:
            print(f"rank {self.rank} worker {worker}: {skipped} validation samples could not be "
                  "decoded, and no sample of this slice could", flush=True)


def sliced_loader(split: SlicedSplit, workers: int) -> DataLoader:
    """The split through a DataLoader (pinned batches on GPU machines)."""
    return DataLoader(split, batch_size=None, num_workers=workers,
                      pin_memory=torch.cuda.is_available(),
                      prefetch_factor=2 if workers else None)
