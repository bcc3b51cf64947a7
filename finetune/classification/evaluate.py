"""Top-1 accuracy of a classifier on labelled shards."""

from __future__ import annotations

import torch
from torch import nn

from finetune.classification.data import classification_transform, label_index
from finetune.config import ClassificationData
from pretrain.data import ordered_dataset


@torch.no_grad()
def evaluate_top1(model: nn.Module, cfg: ClassificationData, batch_size: int = 256) -> dict:
    """Top-1 over every sample of ``cfg.val`` (read in order, each exactly once)."""
    transform = classification_transform(cfg, training=False)
    dataset = (ordered_dataset(cfg.val).decode("pil").to_tuple("jpg;png;webp", "json")
               .map_tuple(lambda image: transform(image.convert("RGB")),
                          lambda meta: label_index(meta, cfg))
               .batched(batch_size, partial=True))
    model.eval()
    correct = total = 0
    for images, labels in dataset:
        predictions = model(images).argmax(dim=1)
        correct += (predictions == torch.as_tensor(labels)).sum().item()
        total += len(labels)
    if total == 0:
        raise ValueError(f"no validation samples in {cfg.val}")
    return {"top1": correct / total, "samples": total}
