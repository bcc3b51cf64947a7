"""COCO box and mask AP of detections, with pycocotools' COCOeval.

Detections are scored against the ORIGINAL annotation file, not against the training targets:
COCOeval then treats crowd regions as ignore regions (a detection matched to one is neither
a true nor a false positive) and sizes small / medium / large by the json's areas, which is what
the published numbers use. The results are COCO's json results format, so one rank can gather
every rank's list, write it and score it (and anyone can score the written file again).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from finetune.detection.coco import CocoIndex

# COCOeval.summarize()'s twelve numbers, in its order.
SUMMARY_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                 "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")
MASK_THRESHOLD = 0.5


def to_coco_results(index: CocoIndex, image_id: int, boxes: torch.Tensor, scores: torch.Tensor,
                    labels: torch.Tensor, masks: torch.Tensor | None = None) -> list[dict]:
    """One image's detections as COCO results: ``boxes`` xyxy in the original image's pixels
    -> ``bbox`` xywh, labels 1..K -> ``category_id``, and with ``masks`` ((N, 1, H, W) or
    (N, H, W) probabilities) ``segmentation``, the mask above 0.5 as compressed RLE whose
    ``counts`` is a str, so the list is JSON-serialisable."""
    boxes = boxes.detach().float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    results = [{"image_id": int(image_id), "category_id": index.category_of(int(label)),
                "bbox": box, "score": float(score)}
               for box, score, label in zip(xywh, scores.detach().cpu().tolist(),
                                            labels.detach().cpu().tolist(), strict=True)]
    if masks is not None:
        if masks.dim() == 4:
            masks = masks[:, 0]
        if masks.shape[0] != len(results):
            raise ValueError(f"{masks.shape[0]} masks for {len(results)} boxes")
        binary = (masks.detach().cpu() > MASK_THRESHOLD).numpy().astype(np.uint8)
        for result, mask in zip(results, binary, strict=True):
            rle = mask_utils.encode(np.asfortranarray(mask))
            result["segmentation"] = {"size": [int(s) for s in rle["size"]],
                                      "counts": rle["counts"].decode("ascii")}
    return results


def _zeros(iou_type: str) -> dict[str, float]:
    return {f"{iou_type}/{name}": 0.0 for name in SUMMARY_NAMES}


def score_results(annotation_file: str | Path, results: list[dict],
                  iou_types: Sequence[str] = IOU_TYPES,
                  image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """``{"bbox/AP": ..., "segm/ARl": ...}``: COCOeval's twelve summary numbers per IoU type
    (-1 where the file has no object of an area range, as COCOeval reports it). ``image_ids``
    restricts the evaluation (default: every image of the file, detections or not). No
    results at all scores 0 (COCO.loadRes cannot take an empty list); results without masks
    skip ``segm``. pycocotools' progress prints are silenced."""
    unknown = [t for t in iou_types if t not in IOU_TYPES]
    if unknown:
        raise ValueError(f"IoU types {unknown} are not among {IOU_TYPES}")
    scores: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(str(annotation_file))
        for iou_type in iou_types:
            if iou_type == "segm" and results and not all("segmentation" in r for r in results):
                continue
            if not results:
                scores.update(_zeros(iou_type))
                continue
            # loadRes adds fields to the dicts it gets, so each type gets shallow copies: segm
            # results without their box (as detectron2 does) so that area ranges use the mask's
            # area, bbox ones without their mask.
            drop = "bbox" if iou_type == "segm" else "segmentation"
            typed = [{k: v for k, v in r.items() if k != drop} for r in results]
            evaluator = COCOeval(ground_truth, ground_truth.loadRes(typed), iou_type)
            if image_ids is not None:
                evaluator.params.imgIds = sorted(int(i) for i in image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            scores.update({f"{iou_type}/{name}": float(value)
                           for name, value in zip(SUMMARY_NAMES, evaluator.stats, strict=True)})
    return scores
