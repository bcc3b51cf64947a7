"""Image / mask folders (the ``ADEChallengeData2016`` layout) -> segmentation batches.

Layout: ``<root>/images/<split>/<name>.jpg`` (or .png) with ``<root>/annotations/<split>/
<name>.png``, a single-channel PNG of class indices. With ``reduce_zero_label`` (ADE20K) label
0 ("other") becomes the ignore index and 1..K become 0..K-1.

Training stream (:class:`FolderStream`), exactly resumable like the shard stream: every epoch
is a permutation of the images seeded by (seed, epoch), the same on every rank; item ``g`` of
the concatenated epochs belongs to slot ``g mod (ranks x workers)``, so ranks and workers split
every epoch between them; each item's augmentation draws from a generator seeded by (seed, g).
A worker's position is the number of items it has taken, so resuming is arithmetic: nothing is
read or decoded to get back to the saved position. The logical workers, the positions, the
batches and giving up are :class:`pretrain.engine.stream.ResumableStream`'s.

Validation (:class:`FolderSplit`): image ``i`` (in name order) belongs to slot
``i mod (ranks x workers)``, one image per batch at its own size.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from finetune.segmentation.inference import rescaled_size
from pretrain.engine.random_draws import coin, item_seed, randint, uniform
from pretrain.engine.read_failures import failure_reason
from pretrain.engine.skipped import SkipLog
from pretrain.engine.stream import FileStream, Item, StreamState

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
Sample = tuple[Path, Path]  # image file, annotation file


def list_samples(root: str | Path, split: str, image_dir: str = "images",
                 label_dir: str = "annotations") -> list[Sample]:
    """(image, annotation) pairs of a split, by name; raises naming the folder when it is
    missing or empty, or when an image has no annotation."""
    images = Path(root) / image_dir / split
    labels = Path(root) / label_dir / split
    for folder in (images, labels):
        if not folder.is_dir():
            raise FileNotFoundError(f"no such folder {folder}")
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{images} holds no .jpg or .png image")
    pairs = [(image, labels / f"{image.stem}.png") for image in files]
    missing = [image.name for image, label in pairs if not label.is_file()]
    if missing:
        raise FileNotFoundError(f"{labels}: no annotation for {len(missing)} of {len(pairs)} "
                                f"images (e.g. {missing[0]} needs {Path(missing[0]).stem}.png)")
    return pairs


def read_image(path: Path) -> torch.Tensor:
    """RGB uint8, (3, H, W)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def read_label(path: Path) -> torch.Tensor:
    """Class indices (H, W) int64 from a single-channel PNG (mode L, P or I)."""
    with Image.open(path) as mask:
        if mask.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"{path}: expected a single-channel index PNG, got mode {mask.mode}")
        array = np.asarray(mask)
    return torch.from_numpy(array.astype(np.int64))


def reduce_zero_label(label: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """0 -> ``ignore_index``, k -> k - 1 (ADE20K's label 0 is "other")."""
    reduced = label - 1
    reduced[label == 0] = ignore_index
    reduced[label == ignore_index] = ignore_index  # already-ignored pixels stay ignored
    return reduced


def normalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (or 0..255 float) CHW -> normalised float."""
    return TF.normalize(image.float() / 255.0, list(mean), list(std))


def check_label_values(path: Path, label: torch.Tensor, num_classes: int, ignore_index: int,
                       reduced: bool) -> None:
    """``ValueError`` naming the mask and the config fields when a (reduced) label is neither
    a class of ``data.num_classes`` nor ``data.ignore_index`` (cross-entropy would stop the
    run with a device-side index error), with the ``reduce_zero_label`` hint when that fits."""
    wrong = label[(label != ignore_index) & ((label < 0) | (label >= num_classes))]
    if not wrong.numel():
        return
    hint = ""
    if not reduced and int(wrong.max()) == num_classes:
        hint = ("; masks with 0 = 'other' and classes 1..K (ADE20K) need "
                "data.reduce_zero_label: true")
    after = " after reduce_zero_label" if reduced else ""
    raise ValueError(f"{path}: label {int(wrong.max())} is not a class of data.num_classes "
                     f"{num_classes} (0..{num_classes - 1}{after}) nor data.ignore_index "
                     f"{ignore_index}{hint}")


class LoadPair:
    """(image file, annotation file) -> (uint8 image, label after the dataset's reduction);
    with ``num_classes``, a label outside the classes raises (:func:`check_label_values`)."""

    def __init__(self, reduce_zero: bool, ignore_index: int,
                 num_classes: int | None = None) -> None:
        self.reduce_zero, self.ignore_index = reduce_zero, ignore_index
        self.num_classes = num_classes

    def __call__(self, sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = read_image(sample[0]), self.read_label(sample[1])
        if image.shape[-2:] != label.shape:
            raise ValueError(f"{sample[1]}: mask {tuple(label.shape)} vs image "
                             f"{tuple(image.shape[-2:])}")
        return image, label

    def read_label(self, path: Path) -> torch.Tensor:
        label = read_label(path)
        if self.reduce_zero:
            label = reduce_zero_label(label, self.ignore_index)
        if self.num_classes is not None:
            check_label_values(path, label, self.num_classes, self.ignore_index,
                               self.reduce_zero)
        return label


class TrainAugment:
    """mmseg's ADE20K training pipeline: random rescale into ``scale`` x U(ratio_range)
    keeping the aspect, random ``crop`` (retried up to 10 times until no class covers more
    than ``cat_max_ratio`` of it), horizontal flip, photometric distortion, normalisation, and
    padding to ``crop`` (image 0, label ``ignore_index``). Draws only from ``generator``."""

    CROP_TRIES = 10

    def __init__(self, crop: int, scale: Sequence[int], ratio_range: Sequence[float],
                 cat_max_ratio: float, flip: float, photometric: bool,
                 mean: Sequence[float], std: Sequence[float], ignore_index: int) -> None:
        self.crop, self.scale, self.ratio_range = crop, tuple(scale), tuple(ratio_range)
        self.cat_max_ratio, self.flip, self.photometric = cat_max_ratio, flip, photometric
        self.mean, self.std, self.ignore_index = mean, std, ignore_index

    def __call__(self, image: torch.Tensor, label: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self._rescale(image, label, generator)
        image, label = self._crop(image, label, generator)
        if uniform(generator) < self.flip:
            image, label = image.flip(-1), label.flip(-1)
        image = image.float()
        if self.photometric:
            image = photometric_distortion(image, generator)
        image = normalize(image, self.mean, self.std)
        pad_h, pad_w = self.crop - image.shape[-2], self.crop - image.shape[-1]
        if pad_h > 0 or pad_w > 0:
            image = F.pad(image, (0, max(pad_w, 0), 0, max(pad_h, 0)), value=0.0)
            label = F.pad(label, (0, max(pad_w, 0), 0, max(pad_h, 0)), value=self.ignore_index)
        return image, label

    def _rescale(self, image: torch.Tensor, label: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = self.ratio_range
        ratio = low + (high - low) * uniform(generator)
        size = list(rescaled_size(*image.shape[-2:], [int(s * ratio) for s in self.scale]))
        image = TF.resize(image, size, interpolation=TF.InterpolationMode.BILINEAR,
                          antialias=False)
        label = TF.resize(label[None], size, interpolation=TF.InterpolationMode.NEAREST)[0]
        return image, label

    def _crop(self, image: torch.Tensor, label: torch.Tensor,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = label.shape
        for _ in range(self.CROP_TRIES):
            top = randint(generator, max(height - self.crop, 0) + 1)
            left = randint(generator, max(width - self.crop, 0) + 1)
            crop = label[top:top + self.crop, left:left + self.crop]
            if self.cat_max_ratio >= 1:
                break
            values, counts = crop.unique(return_counts=True)
            counts = counts[values != self.ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return image[:, top:top + self.crop, left:left + self.crop], crop


def photometric_distortion(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion on a 0..255 float image, each step with probability 1/2:
    brightness +-32, contrast x U(0.5, 1.5) (before or after the colour steps, at random),
    saturation x U(0.5, 1.5) and hue +-18 of OpenCV's 180 (torchvision's colour operators)."""
    if coin(generator):
        image = (image + (uniform(generator) * 64 - 32)).clamp(0, 255)
    contrast_first = coin(generator)

    def contrast(x: torch.Tensor) -> torch.Tensor:
        return (x * (0.5 + uniform(generator))).clamp(0, 255) if coin(generator) else x

    if contrast_first:
        image = contrast(image)
    unit = image / 255.0
    if coin(generator):
        unit = TF.adjust_saturation(unit, 0.5 + uniform(generator)).clamp(0, 1)
    if coin(generator):
        unit = TF.adjust_hue(unit, (randint(generator, 37) - 18) / 180.0)
    image = unit * 255.0
    if not contrast_first:
        image = contrast(image)
    return image


def collate_crops(items: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    images, labels = zip(*items, strict=True)
    return {"image": torch.stack(images), "label": torch.stack(labels)}


class FolderStream(FileStream):
    """Endless, exactly resumable training batches for one rank (module docstring).

    An unreadable item is skipped, counted and listed in ``skips``; when every read fails
    (:class:`pretrain.engine.read_failures.FailureStreak`) the stream yields one error item naming
    ``source`` (the config field of the split) instead of a batch, and ends."""

    def __init__(self, samples: list[Sample], load: Callable[[Sample], tuple],
                 augment: TrainAugment, batch_size: int, seed: int, rank: int,
                 world_size: int, num_workers: int, state: StreamState,
                 source: str = "the training split", skips: SkipLog | None = None,
                 collate: Callable[[list[tuple]], dict[str, Any]] = collate_crops) -> None:
        super().__init__(collate, batch_size, seed, rank, world_size, num_workers, state,
                         files=len(samples), source=source, skips=skips)
        self.samples, self.load, self.augment = samples, load, augment

    @staticmethod
    def item_path(sample: Any) -> Any:
        """The file an item names, for the skip list (the image of an (image, mask) pair)."""
        return sample[0] if isinstance(sample, tuple) else sample

    def sample_at(self, index: int) -> Sample:
        """The image of item ``index`` of the stream (every rank agrees on it)."""
        epoch, within = divmod(index, len(self.samples))
        if getattr(self, "_epoch", None) != epoch:
            generator = torch.Generator().manual_seed(item_seed(self.seed, epoch) ^ 0x5EED)
            self._order, self._epoch = torch.randperm(len(self.samples), generator=generator), epoch
        return self.samples[int(self._order[within])]

    def items(self, worker: int, consumed: int) -> Iterator[Item]:
        """A worker's items from its ``consumed``-th on, each seeded by its stream index."""
        for taken, index in self.lane(worker, consumed):
            yield Item(self.sample_at(index), seed=item_seed(self.seed, index),
                       consumed=taken + 1)

    def load_item(self, item: Item) -> tuple:
        """Load, then augment drawing only from a generator seeded with the item's seed."""
        image, label = self.load(item.source)
        return self.augment(image, label, torch.Generator().manual_seed(item.seed))


class FolderSplit(IterableDataset):
    """This rank's validation images, one per batch: ``image`` (1, 3, H, W) normalised at its
    own size, ``label`` (1, H, W), ``index`` (its place in the split) and ``skipped``
    (unreadable images since the previous batch; the slice's last batch also carries those met
    after it). Every unreadable image is listed in ``skips``."""

    def __init__(self, samples: list[Sample], load: Callable[[Sample], tuple],
                 mean: Sequence[float], std: Sequence[float], rank: int,
                 world_size: int, skips: SkipLog | None = None) -> None:
        super().__init__()
        self.samples, self.load = samples, load
        self.mean, self.std = mean, std
        self.rank, self.world_size = rank, world_size
        self.skips = skips or SkipLog(None)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slots, slot = self.world_size * workers, self.rank * workers + worker
        skipped, pending = 0, None
        for index in range(slot, len(self.samples), slots):
            try:
                image, label = self.load(self.samples[index])
            except Exception as error:  # an unreadable image is counted and listed
                self.skips.record_once("val", str(self.samples[index][0]),
                                       failure_reason(error))
                skipped += 1
                continue
            if pending is not None:  # held back one image: the last carries the last skips
                yield {**pending, "skipped": skipped}
                skipped = 0
            pending = {"image": normalize(image, self.mean, self.std)[None],
                       "label": label[None], "index": torch.tensor([index])}
        if pending is not None:
            yield {**pending, "skipped": skipped}
