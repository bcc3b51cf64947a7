"""The detection evaluator: every rank runs single-scale inference on its slice of val; the
detections, as COCO results (boxes xywh, masks as RLE, original category ids), are gathered on
rank 0, written as one results JSON and scored by COCOeval against the original ground-truth
file; every rank gets the 12-number summaries of ``bbox`` (and ``segm``)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from data_tools.files import atomic_write_text
from finetune.config import DetectionConfig
from finetune.detection.coco import CocoIndex
from finetune.detection.metrics import score_results, to_coco_results
from pretrain import distributed
from pretrain.task import Batch, Evaluator


class DetectionEvaluator(Evaluator):
    def __init__(self, batches: Iterable[Batch], index: CocoIndex, cfg: DetectionConfig,
                 results_file: Path | None) -> None:
        self._batches, self.index = batches, index
        self.mask_thresh = cfg.eval.mask_thresh
        self.iou_types = ("bbox", "segm") if cfg.model.has_masks else ("bbox",)
        self.results_file = results_file
        self.reset()

    def batches(self) -> Iterable[Batch]:
        return self._batches

    def reset(self) -> None:
        self.results: list[dict[str, Any]] = []
        self.images = self.skipped = 0

    def update(self, module: nn.Module, batch: Batch, counted: bool) -> None:
        outputs = module.predict(batch["images"])
        if not counted:
            return
        for image_id, output in zip(batch["image_id"].tolist(), outputs, strict=True):
            masks = output.get("masks")
            if masks is not None:  # binarised here so that to_coco_results' 0.5 keeps them
                masks = (masks.float() >= self.mask_thresh).float().cpu()
            self.results += to_coco_results(self.index, image_id, output["boxes"].float().cpu(),
                                            output["scores"].float().cpu(),
                                            output["labels"].cpu(), masks)
        self.images += len(outputs)
        self.skipped += int(batch.get("skipped", 0))

    def compute(self) -> dict[str, Any]:
        counts = distributed.all_reduce([float(self.images), float(self.skipped)])
        if counts[0] == 0:
            raise ValueError(f"{self.index.annotation_file}: the validation split yielded no "
                             "image")
        gathered = distributed.gather_objects(self.results)
        metrics = None
        if gathered is not None:  # rank 0
            results = [r for part in gathered for r in part]
            if self.results_file is not None:
                self.results_file.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(self.results_file, json.dumps(results))
            metrics = score_results(self.index.annotation_file, results, self.iou_types,
                                    image_ids=self.index.image_ids)
        metrics = distributed.broadcast_object(metrics)
        return {**metrics, "images": int(counts[0]), "skipped": int(counts[1]),
                "detections": int(distributed.all_reduce([float(len(self.results))])[0])}
