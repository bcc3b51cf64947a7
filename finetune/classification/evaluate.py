"""Score a classifier on a labelled validation split, in one process (the trainer evaluates
during training on every rank; this is the same evaluator for a model in hand)."""

from __future__ import annotations

from typing import Any

from torch import nn

from finetune.classification.data import (
    LabelledImageDecoder,
    classification_transform,
    collate_labelled,
)
from finetune.classification.metrics import AccuracyEvaluator
from finetune.config import ClassificationData
from pretrain.engine.eval_slices import SlicedSplit, sliced_loader
from pretrain.engine.task import run_evaluation


def evaluate_classifier(model: nn.Module, data: ClassificationData, batch_size: int = 128,
                        workers: int = 0) -> dict[str, Any]:
    """Top-1 / top-5 of ``model`` (a timm classifier) over every sample of ``data.val``."""
    from finetune.classification.task import ClassifierModule

    split = SlicedSplit(data.val, LabelledImageDecoder(data, classification_transform(
        data, training=False)), collate_labelled, batch_size, rank=0, world_size=1)
    evaluator = AccuracyEvaluator(sliced_loader(split, workers), data.num_classes)
    return run_evaluation(evaluator, ClassifierModule(model), lambda batch: batch)
