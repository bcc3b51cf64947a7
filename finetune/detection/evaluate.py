"""The detection evaluator: every rank runs single-scale inference on its slice of val; the
detections, as COCO results (boxes xywh, masks as RLE, original category ids), are gathered on
rank 0, written as one results JSON and scored by COCOeval against the original ground-truth
file; every rank gets the 12-number summaries of ``bbox`` (and ``segm``).

COCOeval scores the images that were read (``images``): an unreadable one (``skipped``, listed
in the run's ``skipped.jsonl``) is left out of its image set rather than counted as all misses.
``images + skipped`` is every image of the json."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from data_tools.files import atomic_write_text
from finetune.config import DetectionConfig
from finetune.detection.coco import CocoIndex
from finetune.detection.data import read_coco_image
from finetune.detection.metrics import score_results, to_coco_results
from pretrain.engine import distributed
from pretrain.engine.read_failures import failure_reason, unreadable_split_error
from pretrain.engine.task import Batch, Evaluator


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
        self.image_ids: list[int] = []  # the images this rank read and scored

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
        self.image_ids += batch["image_id"].tolist()

    def compute(self) -> dict[str, Any]:
        images = int(distributed.all_reduce([float(len(self.image_ids))])[0])
        if images == 0:
            raise ValueError(unreadable_split_error(
                "data.val_images", self.index.image_root, len(self.index.image_ids),
                self.index.listed_path(self.index.image_ids[0]), self._first_failure()))
        gathered = distributed.gather_objects((self.results, self.image_ids))
        metrics = None
        if gathered is not None:  # rank 0
            results = [r for part, _ in gathered for r in part]
            read = sorted(i for _, ids in gathered for i in ids)
            if self.results_file is not None:
                self.results_file.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(self.results_file, json.dumps(results))
            metrics = score_results(self.index.annotation_file, results, self.iou_types,
                                    image_ids=read)
        metrics = distributed.broadcast_object(metrics)
        return {**metrics, "images": images, "skipped": len(self.index.image_ids) - images,
                "detections": int(distributed.all_reduce([float(len(self.results))])[0])}

    def _first_failure(self) -> str:
        """Why the split's first image cannot be read (for the one-line error)."""
        try:
            read_coco_image(self.index, self.index.image_ids[0])
        except Exception as error:  # the reason is the message
            return failure_reason(error)
        return "it reads now"
