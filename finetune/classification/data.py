"""Labelled images (shards or an ImageFolder) -> classification batches (timm's augmentation
and transforms)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import torch
from timm.data import create_transform

from data_tools.imagefolder import ImageFolderIndex, scan_imagefolder
from finetune.config import ClassificationData
from pretrain.engine.images import decode_image


def label_index(meta: dict[str, Any], cfg: ClassificationData) -> int:
    """The class index of a sample's metadata; raises on a missing or unknown label."""
    label = meta[cfg.label_key]
    index = cfg.classes.index(label) if cfg.classes is not None else int(label)
    if not 0 <= index < cfg.num_classes:
        raise ValueError(f"label {label!r} outside 0..{cfg.num_classes - 1}")
    return index


def classification_transform(cfg: ClassificationData, training: bool,
                             linear_probe: bool = False) -> Callable:
    """timm's ImageNet pipeline: RandomResizedCrop + RandAugment + random erasing for training
    (crop and flip only for a linear probe), resize + centre crop for evaluation; normalised
    by ``data.mean`` / ``data.std``."""
    if training and linear_probe:
        return create_transform(cfg.image_size, is_training=True, scale=cfg.scale,
                                color_jitter=None, interpolation="bicubic", mean=cfg.mean,
                                std=cfg.std)
    if training:
        return create_transform(
            cfg.image_size, is_training=True, scale=cfg.scale, auto_augment=cfg.randaugment,
            re_prob=cfg.random_erasing, interpolation="bicubic", mean=cfg.mean,
            std=cfg.std)
    return create_transform(cfg.image_size, is_training=False, crop_pct=cfg.crop_pct,
                            interpolation="bicubic", mean=cfg.mean, std=cfg.std)


class LabelledImageDecoder:
    """Raw sample -> (transformed image, class index)."""

    def __init__(self, cfg: ClassificationData, transform: Callable) -> None:
        self.cfg = cfg
        self.transform = transform

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
        meta = json.loads(sample["json"])
        return self.transform(decode_image(sample)), label_index(meta, self.cfg)


def collate_labelled(items: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    images, labels = zip(*items, strict=True)
    return {"image": torch.stack(images), "label": torch.tensor(labels)}


def imagefolder_index(cfg: ClassificationData, split: str) -> ImageFolderIndex:
    """The ``train`` or ``val`` ImageFolder of the config, both in the training split's class
    order (``data.classes``, else the training folder's sorted names); ``ValueError`` when the
    class count is not ``data.num_classes``."""
    classes = cfg.classes
    if classes is None:
        if not os.path.isdir(cfg.train):
            raise FileNotFoundError(f"no such image folder: {cfg.train}")
        classes = sorted(e.name for e in os.scandir(cfg.train) if e.is_dir())
    if len(classes) != cfg.num_classes:
        raise ValueError(f"{cfg.train}: {len(classes)} class folders, but data.num_classes is "
                         f"{cfg.num_classes}")
    return scan_imagefolder(cfg.train if split == "train" else cfg.val, classes)
