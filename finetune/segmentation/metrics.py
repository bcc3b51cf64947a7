"""mIoU, mAcc, aAcc and per-class IoU from one confusion matrix over the whole split.

Each rank accumulates a ``num_classes x num_classes`` matrix (rows: ground truth, columns:
prediction; ignored pixels left out) on its device; the matrices are summed across ranks
(:func:`pretrain.engine.distributed.all_reduce`) and the scores computed once from the sum, so the
result is the split's, not a mean of per-image scores. As mmseg: a class absent from the
split's ground truth and never predicted has no IoU (NaN) and is left out of the means; one
absent from the ground truth but predicted somewhere has IoU 0.
"""

from __future__ import annotations

import math

import torch

from pretrain.engine import distributed


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                     ignore_index: int) -> torch.Tensor:
    """Counts (int64, ``[gt, pred]``) of the pixels whose label is not ``ignore_index``."""
    keep = label != ignore_index
    truth, guess = label[keep].long(), pred[keep].long()
    if truth.numel() and (truth.min() < 0 or truth.max() >= num_classes):
        raise ValueError(f"labels outside 0..{num_classes - 1} (and not the ignore index "
                         f"{ignore_index}) in the ground truth")
    counts = torch.bincount(truth * num_classes + guess, minlength=num_classes ** 2)
    return counts.reshape(num_classes, num_classes)


def scores(matrix: torch.Tensor, class_names: list[str] | None = None) -> dict[str, float]:
    """``mIoU``, ``mAcc``, ``aAcc`` (fractions) and ``IoU.<class>`` from a summed matrix."""
    matrix = matrix.double()
    hits = matrix.diag()
    truth, predicted = matrix.sum(1), matrix.sum(0)
    union = truth + predicted - hits
    iou = torch.where(union > 0, hits / union.clamp(min=1), torch.nan)
    accuracy = torch.where(truth > 0, hits / truth.clamp(min=1), torch.nan)
    total = float(truth.sum())
    if total == 0:
        raise ValueError("the validation split has no labelled pixel")
    names = class_names or [str(i) for i in range(len(hits))]
    results = {"mIoU": float(iou.nanmean()), "mAcc": float(accuracy.nanmean()),
               "aAcc": float(hits.sum()) / total}
    for name, value in zip(names, iou.tolist(), strict=True):
        results[f"IoU.{name}"] = value if not math.isnan(value) else float("nan")
    return results


class ConfusionMatrix:
    """Accumulates on the device (no host sync per image); :meth:`compute` is collective."""

    def __init__(self, num_classes: int, ignore_index: int) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.reset()

    def reset(self) -> None:
        self.matrix: torch.Tensor | None = None

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        counts = confusion_matrix(pred, label, self.num_classes, self.ignore_index)
        self.matrix = counts if self.matrix is None else self.matrix + counts

    def summed(self) -> torch.Tensor:
        """Collective: the matrix summed over every rank (float64 keeps counts exact)."""
        local = (self.matrix.double().cpu() if self.matrix is not None
                 else torch.zeros(self.num_classes, self.num_classes, dtype=torch.float64))
        return distributed.all_reduce(local)
