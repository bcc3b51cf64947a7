"""Top-1 / top-5 accuracy over a validation split, summed across ranks."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pretrain import distributed
from pretrain.task import Batch, Evaluator


class AccuracyEvaluator(Evaluator):
    """Counts correct top-1 / top-k predictions on this rank (on the device, no host sync per
    batch) and sums the counts over ranks: exact accuracy over the whole split."""

    def __init__(self, batches: Iterable[Batch], num_classes: int) -> None:
        self._batches = batches
        self.k = min(5, num_classes)
        self.reset()

    def batches(self) -> Iterable[Batch]:
        return self._batches

    def reset(self) -> None:
        self.counts: torch.Tensor | None = None  # correct top-1, correct top-k, samples
        self.skipped = 0

    def update(self, module: nn.Module, batch: Batch, counted: bool) -> None:
        logits = module.logits(batch["image"])
        if not counted:
            return
        labels = batch["label"]
        top = logits.topk(self.k, dim=1).indices
        hits = top == labels[:, None]
        counts = torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(),
                              torch.tensor(len(labels), device=labels.device)]).double()
        self.counts = counts if self.counts is None else self.counts + counts
        self.skipped += int(batch.get("skipped", 0))

    def compute(self) -> dict[str, Any]:
        local = (self.counts.cpu() if self.counts is not None
                 else torch.zeros(3, dtype=torch.float64))
        skipped = torch.tensor([float(self.skipped)], dtype=torch.float64)
        top1, topk, samples, skipped = distributed.all_reduce(torch.cat([local, skipped])).tolist()
        if samples == 0:
            raise ValueError("the validation split yielded no sample")
        return {"top1": top1 / samples, f"top{self.k}": topk / samples,
                "samples": int(samples), "skipped": int(skipped)}
