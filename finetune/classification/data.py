"""Labelled image shards -> classification batches (timm's augmentation and transforms)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch
from timm.data import create_transform

from finetune.config import ClassificationData
from pretrain.data import OPENAI_MEAN, OPENAI_STD, decode_image


def label_index(meta: dict[str, Any], cfg: ClassificationData) -> int:
    """The class index of a sample's metadata; raises on a missing or unknown label."""
    label = meta[cfg.label_key]
    index = cfg.classes.index(label) if cfg.classes is not None else int(label)
    if not 0 <= index < cfg.num_classes:
        raise ValueError(f"label {label!r} outside 0..{cfg.num_classes - 1}")
    return index


def classification_transform(cfg: ClassificationData, training: bool) -> Callable:
    """timm's ImageNet pipeline: RandomResizedCrop + RandAugment + random erasing for training,
    resize + centre crop for evaluation; normalised like pretraining (OpenAI mean/std)."""
    if training:
        return create_transform(
            cfg.image_size, is_training=True, scale=cfg.scale, auto_augment=cfg.randaugment,
            re_prob=cfg.random_erasing, interpolation="bicubic", mean=OPENAI_MEAN,
            std=OPENAI_STD)
    return create_transform(cfg.image_size, is_training=False, crop_pct=cfg.crop_pct,
                            interpolation="bicubic", mean=OPENAI_MEAN, std=OPENAI_STD)


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
