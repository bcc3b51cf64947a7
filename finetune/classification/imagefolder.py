"""ImageFolder splits read directly: a resumable training stream and validation slices.

Training: epoch ``e`` visits the images in a permutation seeded by ``(seed, e)``; the endless
concatenation of epochs is dealt out like cards, item ``g`` to slot ``g mod (ranks x workers)``,
so within an epoch no image is read twice across ranks and workers. A worker's position is the
number of items it has taken (``consumed``): resuming recomputes the same permutations and
starts there, without reading a file. Each image's augmentation is seeded from its place in the
worker's stream (torch and Python's ``random``, which timm's crops and RandAugment use), so a
resumed run sees exactly the batches of an uninterrupted one. The logical workers, the
seeding, the positions and giving up are :class:`pretrain.engine.stream.ResumableStream`'s.
Undecodable images are skipped and counted.

Validation: image ``i`` (in the folder's fixed order) goes to slot ``i mod (ranks x workers)``,
as :mod:`pretrain.engine.eval_slices` slices shards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from data_tools.imagefolder import ImageFolderIndex
from pretrain.engine.images import decode_image
from pretrain.engine.random_draws import item_seed
from pretrain.engine.read_failures import failure_reason
from pretrain.engine.skipped import SkipLog
from pretrain.engine.stream import FileStream, Item, StreamState


def decode_file(index: ImageFolderIndex, item: int) -> Any:
    """The image of ``index``'s item as RGB (raising on unreadable or undecodable files)."""
    return decode_image({"jpg": index.path(item).read_bytes()})


class ImageFolderStream(FileStream):
    """Endless labelled batches for one rank of an ImageFolder; see the module docstring.
    ``transform(pil_image)`` augments; ``collate(list of (tensor, label))`` makes the batch."""

    def __init__(self, index: ImageFolderIndex, transform: Callable,
                 collate: Callable[[list[tuple]], dict[str, torch.Tensor]], batch_size: int,
                 seed: int, rank: int, world_size: int, num_workers: int,
                 state: StreamState, source: str | None = None,
                 skips: SkipLog | None = None) -> None:
        super().__init__(collate, batch_size, seed, rank, world_size, num_workers, state,
                         files=len(index), source=source or str(index.root), skips=skips)
        self.index, self.transform = index, transform
        self._epoch: tuple[int, np.ndarray] | None = None

    def image_at(self, index: int) -> int:
        """The image item ``index`` of the endless sequence is (see the module docstring)."""
        epoch, offset = divmod(index, len(self.index))
        if self._epoch is None or self._epoch[0] != epoch:
            generator = np.random.default_rng([self.seed, epoch])
            self._epoch = (epoch, generator.permutation(len(self.index)))
        return int(self._epoch[1][offset])

    def items(self, worker: int, consumed: int) -> Iterator[Item]:
        """Each image seeded by its place in the worker's stream."""
        for taken, index in self.lane(worker, consumed):
            yield Item(self.image_at(index),
                       seed=item_seed(self.seed, self.rank, worker, taken), consumed=taken + 1)

    def item_path(self, source: int) -> Path:
        return self.index.path(source)

    def load_item(self, item: Item) -> tuple[torch.Tensor, int]:
        image = self.transform(decode_file(self.index, item.source))
        return image, int(self.index.labels[item.source])


class ImageFolderSplit(IterableDataset):
    """This rank's validation batches of an ImageFolder (``{"image", "label", "skipped"}``);
    each worker holds its last batch back until its slice ends, so that batch carries the
    images skipped after it too. Every unreadable image is listed in ``skips``."""

    def __init__(self, index: ImageFolderIndex, transform: Callable,
                 collate: Callable[[list[tuple]], dict[str, torch.Tensor]], batch_size: int,
                 rank: int, world_size: int, skips: SkipLog | None = None) -> None:
        super().__init__()
        self.index, self.transform, self.collate = index, transform, collate
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.skips = skips or SkipLog(None)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slots = self.world_size * workers
        items: list[tuple] = []
        pending: dict[str, Any] | None = None
        skipped = 0  # since the last batch handed out
        for item in range(self.rank * workers + worker, len(self.index), slots):
            try:
                image = self.transform(decode_file(self.index, item))
            except Exception as error:  # counted in the evaluation's "skipped", never fatal
                self.skips.record_once("val", str(self.index.path(item)), failure_reason(error))
                skipped += 1
                continue
            items.append((image, int(self.index.labels[item])))
            if len(items) == self.batch_size:
                if pending is not None:
                    yield {**pending, "skipped": skipped}
                    skipped = 0
                pending, items = self.collate(items), []
        if items:
            if pending is not None:
                yield {**pending, "skipped": skipped}
                skipped = 0
            pending = self.collate(items)
        if pending is not None:
            yield {**pending, "skipped": skipped}
        elif skipped:
            print(f"rank {self.rank} worker {worker}: none of the {skipped} validation images "
                  "of this slice could be decoded (listed in the run's skipped.jsonl, not "
                  "counted in 'skipped')", flush=True)
