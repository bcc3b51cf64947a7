"""COCO detection batches: the published training augmentations, an exactly resumable
training stream grouped by aspect ratio, and the validation slices.

Training (:class:`CocoTrainStream`) is :class:`finetune.segmentation.data.FolderStream`'s
stream over the training image ids: every epoch a permutation seeded by (seed, epoch), the
same on every rank; item ``g`` of the concatenated epochs belongs to slot
``g mod (ranks x workers)``; each item's augmentation draws from a generator seeded by
(seed, g). On top of it, a worker groups its items into batches by aspect ratio (torchvision's
``GroupedBatchSampler`` with two groups: landscape or square, and portrait), so that a padded
batch wastes little. The group of an item comes from the json's image size, so the grouping is
arithmetic: a worker's position is still the number of items it has taken, and on resume it
replays the grouping of those items without reading a file to know which items wait in the
half-filled group. Items are decoded only when their group fills up, so an unreadable image is
skipped and counted exactly once; that batch then holds fewer images (a batch with none left
is not yielded).

An image whose objects the random crop removes entirely stays in its batch with an empty
target, as mmdet's ``RandomCrop(allow_negative_crop=True)`` of the recipes keeps it:
torchvision's detectors take empty targets (all anchors/proposals are background).

Validation (:class:`CocoValSplit`): every image of the file (validation is kept whole), image
``i`` in id order belongs to slot ``i mod (ranks x workers)``, one image per batch at its
original size; COCOeval gets the detections in those pixels.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import IterableDataset, get_worker_info

from finetune.detection.coco import CocoIndex
from finetune.segmentation.data import FolderStream, read_image
from finetune.segmentation.inference import rescaled_size
from pretrain.engine.random_draws import choice, item_seed, randint, uniform
from pretrain.engine.read_failures import failure_reason
from pretrain.engine.skipped import SkipLog
from pretrain.engine.stream import Item, StreamState

Target = dict[str, torch.Tensor]
POLICIES = ("multiscale", "crop", "none")
# mmdet's AutoAugment policy of the Swin / DaViT 3x recipes picks one of its two branches.
CROP_BRANCH_PROBABILITY = 0.5


def flip_horizontally(image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
    """Mirror the image, its masks and its boxes (x -> W - x)."""
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, 0], boxes[:, 2] = width - target["boxes"][:, 2], width - target["boxes"][:, 0]
    return image.flip(-1), {**target, "boxes": boxes, "masks": target["masks"].flip(-1)}


def resize_keep_ratio(image: torch.Tensor, target: Target, short: int,
                      max_size: int) -> tuple[torch.Tensor, Target]:
    """Short side to ``short`` unless the long side would pass ``max_size`` (mmdet's
    keep-ratio ``Resize`` to ``(max_size, short)``); bilinear image, nearest masks (pixel-centre
    aligned ``NEAREST_EXACT``: the legacy ``NEAREST`` shifts masks up-left by up to half a
    source pixel against their boxes), boxes scaled by the per-axis factors of the rounded
    size."""
    height, width = image.shape[-2:]
    size = list(rescaled_size(height, width, (max_size, short)))
    if size == [height, width]:
        return image, target
    image = TF.resize(image, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=False)
    masks = target["masks"]
    if masks.shape[0]:
        masks = TF.resize(masks, size, interpolation=TF.InterpolationMode.NEAREST_EXACT)
    else:
        masks = masks.new_zeros((0, *size))
    scale = torch.tensor([size[1] / width, size[0] / height] * 2)
    return image, {**target, "boxes": target["boxes"] * scale, "masks": masks}


def crop(image: torch.Tensor, target: Target, top: int, left: int, height: int,
         width: int) -> tuple[torch.Tensor, Target]:
    """The window's pixels and masks; boxes shifted and clipped to it, objects whose box is
    then under a pixel wide or high removed (mmdet's ``RandomCrop``)."""
    boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    keep = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
    window = (slice(top, top + height), slice(left, left + width))
    return image[:, window[0], window[1]], {
        **target, "boxes": boxes[keep], "labels": target["labels"][keep],
        "masks": target["masks"][keep][:, window[0], window[1]],
    }


class DetectionAugment:
    """Training augmentation of the published recipes, drawing only from ``generator`` (so
    a resumed stream augments each image as before).

    - ``multiscale`` (Mask R-CNN 1x/3x): horizontal flip with probability ``flip``, then the
      short side resized to a random one of ``scales`` with the long side at most
      ``max_size``;
    - ``crop`` (the DaViT / Swin 3x recipe, mmdet's two-branch ``AutoAugment``): the flip, then
      with probability 1/2 the ``multiscale`` resize; otherwise the short side resized to one of
      ``crop_scales``, a random crop whose height and width are each uniform in
      ``[min(side, crop_size[0]), min(side, crop_size[1])]`` (mmdet's ``absolute_range``), and
      then the ``multiscale`` resize;
    - ``none``: the flip only (tests, and inputs already at their training size).

    Images are uint8 (3, H, W) in and out.
    """

    def __init__(self, policy: str, scales: Sequence[int], max_size: int, flip: float = 0.5,
                 crop_scales: Sequence[int] = (400, 500, 600),
                 crop_size: tuple[int, int] = (384, 600)) -> None:
        if policy not in POLICIES:
            raise ValueError(f"augmentation policy {policy!r} is not one of {POLICIES}")
        if policy != "none" and not scales:
            raise ValueError(f"augmentation policy {policy!r} needs at least one scale")
        if policy == "crop" and (not crop_scales or not 0 < crop_size[0] <= crop_size[1]):
            raise ValueError("the crop policy needs crop_scales and 0 < crop_size[0] <= "
                             f"crop_size[1], got {tuple(crop_scales)} and {tuple(crop_size)}")
        self.policy, self.scales, self.max_size = policy, tuple(scales), max_size
        self.flip, self.crop_scales, self.crop_size = flip, tuple(crop_scales), tuple(crop_size)

    def __call__(self, image: torch.Tensor, target: Target,
                 generator: torch.Generator) -> tuple[torch.Tensor, Target]:
        if uniform(generator) < self.flip:
            image, target = flip_horizontally(image, target)
        if self.policy == "none":
            return image, target
        if self.policy == "crop" and uniform(generator) >= CROP_BRANCH_PROBABILITY:
            image, target = resize_keep_ratio(image, target, choice(generator, self.crop_scales),
                                              self.max_size)
            image, target = self._random_crop(image, target, generator)
        return resize_keep_ratio(image, target, choice(generator, self.scales), self.max_size)

    def _random_crop(self, image: torch.Tensor, target: Target,
                     generator: torch.Generator) -> tuple[torch.Tensor, Target]:
        height, width = image.shape[-2:]
        low, high = self.crop_size
        crop_h = min(height, low) + randint(generator, min(height, high) - min(height, low) + 1)
        crop_w = min(width, low) + randint(generator, min(width, high) - min(width, low) + 1)
        top = randint(generator, height - crop_h + 1)
        left = randint(generator, width - crop_w + 1)
        return crop(image, target, top, left, crop_h, crop_w)


def read_coco_image(index: CocoIndex, image_id: int) -> torch.Tensor:
    """The image as uint8 (3, H, W); raises when the file is unreadable or its size is not the
    json's (its masks and its boxes would not fit it)."""
    image = read_image(index.image_path(image_id))
    if tuple(image.shape[-2:]) != index.image_size(image_id):
        raise ValueError(f"{index.image_path(image_id)} is {tuple(image.shape[-2:])}, the json "
                         f"says {index.image_size(image_id)}")
    return image


class LoadCocoImage:
    """Image id -> (uint8 image, its target), the ``load`` of the training stream."""

    def __init__(self, index: CocoIndex) -> None:
        self.index = index

    def __call__(self, image_id: int) -> tuple[torch.Tensor, Target]:
        return read_coco_image(self.index, image_id), self.index.target(image_id)


def aspect_group(height: int, width: int) -> int:
    """0 for landscape or square images, 1 for portrait ones."""
    return 0 if width >= height else 1


def collate_detection(items: list[tuple[torch.Tensor, Target]]) -> dict[str, list]:
    """Images of several sizes stay a list (the detector pads them), with their targets."""
    return {"images": [image for image, _ in items], "targets": [target for _, target in items]}


class CocoTrainStream(FolderStream):
    """Endless, exactly resumable, aspect-grouped training batches for one rank (module
    docstring): ``{"images": [uint8 (3, h, w)], "targets": [{"boxes", "labels", "masks"}],
    "worker", "position"}``, for :class:`pretrain.engine.stream.TrainLoader`."""

    def __init__(self, index: CocoIndex, augment: DetectionAugment, batch_size: int, seed: int,
                 rank: int, world_size: int, num_workers: int, state: StreamState,
                 group_by_aspect: bool = True, source: str = "the training images",
                 skips: SkipLog | None = None) -> None:
        image_ids = index.training_image_ids()
        if not image_ids:
            raise ValueError(f"{index.annotation_file}: no image has a usable (non-crowd, "
                             "non-empty) object to train on")
        super().__init__(image_ids, LoadCocoImage(index), augment, batch_size, seed, rank,
                         world_size, num_workers, state, source, skips,
                         collate=collate_detection)
        self.index, self.group_by_aspect = index, group_by_aspect

    def item_path(self, image_id: int) -> Any:
        return self.index.listed_path(image_id)

    def _group(self, index: int) -> int:
        return aspect_group(*self.index.image_size(self.sample_at(index))) \
            if self.group_by_aspect else 0

    def items(self, worker: int, consumed: int) -> Iterator[Item]:
        """A worker's items grouped by aspect: a group's items come once it is full, the last
        one ending the batch (of those that load); every item's position is the group's."""
        groups: tuple[list[int], list[int]] = ([], [])
        for taken, index in self.lane(worker):
            group = groups[self._group(index)]
            group.append(index)
            if len(group) < self.batch_size:
                continue
            # A group filled before the resume point was a batch before it: its grouping is
            # replayed (which items wait in the other group), no file is read.
            if taken >= consumed:
                for member in group:
                    yield Item(self.sample_at(member), seed=item_seed(self.seed, member),
                               consumed=taken + 1, ends_batch=member == group[-1])
            group.clear()


class CocoValSplit(IterableDataset):
    """This rank's validation images, one per batch at the original size: ``images``
    ([uint8 (3, H, W)]), ``image_id`` (a one-element tensor) and ``skipped`` (unreadable
    images, counted and listed in ``skips`` as :class:`finetune.segmentation.data.FolderSplit`
    does)."""

    def __init__(self, index: CocoIndex, rank: int, world_size: int,
                 skips: SkipLog | None = None) -> None:
        super().__init__()
        self.index, self.rank, self.world_size = index, rank, world_size
        self.skips = skips or SkipLog(None)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slots, slot = self.world_size * workers, self.rank * workers + worker
        skipped, pending = 0, None
        for image_id in self.index.image_ids[slot::slots]:
            try:
                image = read_coco_image(self.index, image_id)
            except Exception as error:  # an unreadable image is counted and listed
                self.skips.record_once("val", self.index.listed_path(image_id),
                                       failure_reason(error))
                skipped += 1
                continue
            if pending is not None:  # held back one image: the last carries the last skips
                yield {**pending, "skipped": skipped}
                skipped = 0
            pending = {"images": [image], "image_id": torch.tensor([image_id])}
        if pending is not None:
            yield {**pending, "skipped": skipped}
