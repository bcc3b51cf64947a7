"""The segmentation evaluator: inference in the configured mode on every image of this rank's
slice, a confusion matrix summed across ranks, optional prediction PNGs and overlays."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from finetune.config import SegmentationConfig, SegmentationData
from finetune.segmentation.data import LoadPair, Sample, read_image
from finetune.segmentation.inference import predict_logits, predict_multiscale
from finetune.segmentation.metrics import ConfusionMatrix, scores
from pretrain.engine import distributed
from pretrain.engine.read_failures import failure_reason, unreadable_split_error
from pretrain.engine.task import Batch, Evaluator


def ade20k_classes() -> list[str]:
    """The 150 ADE20K (SceneParsing) class names in label order, shipped with the package."""
    text = resources.files("finetune.segmentation").joinpath("ade20k_classes.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def class_names(data: SegmentationData) -> list[str]:
    if data.classes == "ade20k":
        return ade20k_classes()
    if isinstance(data.classes, list):
        return list(data.classes)
    return [str(i) for i in range(data.num_classes)]


def palette(num_classes: int) -> np.ndarray:
    """A fixed colour per class (seeded, so every run and rank draws the same)."""
    return np.random.default_rng(0).integers(0, 256, size=(num_classes, 3), dtype=np.uint8)


class SegmentationEvaluator(Evaluator):
    def __init__(self, batches: Iterable[Batch], cfg: SegmentationConfig,
                 samples: list[Sample], load: Callable[[Sample], tuple] | None = None) -> None:
        self._batches, self.load = batches, load or LoadPair(cfg.data.reduce_zero_label,
                                                             cfg.data.ignore_index)
        self.data, self.eval = cfg.data, cfg.eval
        self.samples = samples
        self.names = class_names(cfg.data)
        self.matrix = ConfusionMatrix(cfg.data.num_classes, cfg.data.ignore_index)
        self.colours = palette(cfg.data.num_classes)
        self.reset()

    def batches(self) -> Iterable[Batch]:
        return self._batches

    def reset(self) -> None:
        self.matrix.reset()
        self.images = 0

    def predict(self, module: nn.Module, image: torch.Tensor) -> torch.Tensor:
        """Class probabilities (or logits) at the image's size, by the configured mode."""
        cfg = self.eval
        if len(cfg.ratios) > 1 or cfg.flip:
            return predict_multiscale(module, image, cfg.ratios, cfg.flip, cfg.mode, cfg.scale,
                                      cfg.crop, cfg.stride)
        scale = [int(side * cfg.ratios[0]) for side in cfg.scale]
        return predict_logits(module, image, cfg.mode, scale, cfg.crop, cfg.stride)

    def update(self, module: nn.Module, batch: Batch, counted: bool) -> None:
        pred = self.predict(module, batch["image"]).argmax(dim=1)
        if not counted:
            return
        self.matrix.update(pred, batch["label"])
        self.images += len(pred)
        if self.eval.predictions_dir is not None or self.eval.overlays:
            for index, mask in zip(batch["index"].tolist(), pred.cpu(), strict=True):
                self._write(index, mask)

    def compute(self) -> dict[str, Any]:
        summed = self.matrix.summed()
        images = int(distributed.all_reduce([float(self.images)])[0])
        if images == 0:
            first = self.samples[0][0]
            raise ValueError(unreadable_split_error(
                "data.val_split", first.parent, len(self.samples), first,
                self._first_failure()))
        # the split is evaluated whole: what was not read was skipped (and listed)
        return {**scores(summed, self.names), "images": images,
                "skipped": len(self.samples) - images}

    def _first_failure(self) -> str:
        """Why the split's first image cannot be read (for the one-line error)."""
        try:
            self.load(self.samples[0])
        except Exception as error:  # the reason is the message
            return failure_reason(error)
        return "it reads now"

    def _write(self, index: int, mask: torch.Tensor) -> None:
        """The prediction as an index PNG in the dataset's label space (+1 under
        reduce_zero_label, as ADE20K's annotations and its benchmark server expect) and, for
        the first ``overlays`` images, the image blended with the class colours."""
        image_path = self.samples[index][0]
        labels = mask.numpy().astype(np.int64)
        if self.eval.predictions_dir is not None:
            out = Path(self.eval.predictions_dir)
            out.mkdir(parents=True, exist_ok=True)
            stored = labels + 1 if self.data.reduce_zero_label else labels
            mode = "L" if stored.max(initial=0) < 256 else "I"
            Image.fromarray(stored.astype(np.uint8 if mode == "L" else np.int32), mode).save(
                out / f"{image_path.stem}.png")
        if index < self.eval.overlays:
            out = Path(self.eval.predictions_dir) / "overlays"
            out.mkdir(parents=True, exist_ok=True)
            photo = read_image(image_path).permute(1, 2, 0).numpy().astype(np.float32)
            blended = 0.5 * photo + 0.5 * self.colours[labels].astype(np.float32)
            Image.fromarray(blended.astype(np.uint8)).save(out / f"{image_path.stem}.jpg")
