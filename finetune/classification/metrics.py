"""Top-1 / top-5 accuracy over a validation split, summed across ranks, for the model and for
any other model scored on the same batches (the EMA of its weights)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from pretrain.engine import distributed
from pretrain.engine.task import Batch, Evaluator

# name prefix -> the extra model to score beside the trainer's module (None: not available yet)
ExtraModels = dict[str, Callable[[], nn.Module | None]]


class AccuracyEvaluator(Evaluator):
    """Counts correct top-1 / top-k predictions on this rank (on the device, no host sync per
    batch) and sums the counts over ranks: exact accuracy over the whole split.

    ``extra`` models (timm classifiers, e.g. ``{"ema_": lambda: ema}``) are scored on the same
    batches, reported as ``<prefix>top1`` and ``<prefix>top5``; each batch is decoded once. They
    run in their own dtype (the image is cast to it)."""

    def __init__(self, batches: Iterable[Batch], num_classes: int,
                 extra: ExtraModels | None = None) -> None:
        self._batches = batches
        self.k = min(5, num_classes)
        self.extra = extra or {}
        self.reset()

    def batches(self) -> Iterable[Batch]:
        return self._batches

    def reset(self) -> None:
        # per prefix: correct top-1, correct top-k, samples
        self.counts: dict[str, torch.Tensor] = {}
        self.skipped = 0

    def _logits(self, batch: Batch, module: nn.Module) -> dict[str, torch.Tensor]:
        logits = {"": module.logits(batch["image"])}
        for prefix, model in self.extra.items():
            extra = model()
            if extra is not None:
                dtype = next(extra.parameters()).dtype
                logits[prefix] = extra(batch["image"].to(dtype)).float()
        return logits

    def update(self, module: nn.Module, batch: Batch, counted: bool) -> None:
        logits = self._logits(batch, module)
        if not counted:
            return
        labels = batch["label"]
        for prefix, scores in logits.items():
            hits = scores.topk(self.k, dim=1).indices == labels[:, None]
            counts = torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(),
                                  torch.tensor(len(labels), device=labels.device)]).double()
            self.counts[prefix] = counts + self.counts.get(prefix, 0)
        self.skipped += int(batch.get("skipped", 0))

    def compute(self) -> dict[str, Any]:
        # every rank reduces the same prefixes, whether or not its slice counted any batch
        prefixes = ["", *self.extra]
        local = torch.cat([self.counts[p].cpu() if p in self.counts
                           else torch.zeros(3, dtype=torch.float64) for p in prefixes]
                          + [torch.tensor([float(self.skipped)], dtype=torch.float64)])
        reduced = distributed.all_reduce(local).tolist()
        samples = reduced[2]
        if samples == 0:
            raise ValueError("the validation split yielded no sample")
        results: dict[str, Any] = {}
        for i, prefix in enumerate(prefixes):
            top1, topk, seen = reduced[3 * i:3 * i + 3]
            if seen:  # an extra model that did not exist yet reports nothing
                results[f"{prefix}top1"] = top1 / seen
                results[f"{prefix}top{self.k}"] = topk / seen
        return {**results, "samples": int(samples), "skipped": int(reduced[-1])}
