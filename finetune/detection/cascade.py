"""Cascade R-CNN RoI heads (Cai & Vasconcelos) on torchvision's RoI ops, which have none.

Three box stages trained at rising IoU (0.5, 0.6, 0.7 by default): stage ``t`` matches and
samples its RoIs at its own IoU threshold (ground-truth boxes added, 512 RoIs per image, 25%
positive, as every stage of mmdet's recipe), regresses them per class with its own target
scaling, and hands the regressed boxes (detached; each RoI regressed for its assigned class, or
for its best-scoring class when it is background) to stage ``t + 1``. Box losses are GIoU on
the decoded boxes (weight 10, mmdet's ``reg_decoded_bbox`` setting of the DWNet / Swin
recipes). Every stage has its own mask head, trained on that stage's positives; stage losses
are weighted 1, 0.5, 0.25. At test time the class logits of the stages are averaged, the boxes
are the last stage's, and the masks the mean of every stage's mask head on those boxes (as
mmdet's ``CascadeRoIHead``).

The class subclasses torchvision's :class:`RoIHeads` so that :class:`MaskRCNN` runs it
unchanged, and reuses its matching, sampling and NMS with each stage's matcher and coder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.roi_heads import (
    RoIHeads,
    maskrcnn_inference,
    maskrcnn_loss,
)
from torchvision.ops import boxes as box_ops
from torchvision.ops import generalized_box_iou_loss

# mmdet's per-stage target stds (0.1, 0.1, 0.2, 0.2) / 2 / 3, as torchvision coder weights.
STAGE_CODER_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0),
                       (30.0, 30.0, 15.0, 15.0))
GIOU_WEIGHT = 10.0
ROIS_PER_IMAGE, POSITIVE_FRACTION = 512, 0.25


class CascadePredictor(nn.Module):
    """Class scores and a box regression per class (``num_classes`` with background)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes)
        self.bbox_pred = nn.Linear(in_features, 4 * num_classes)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cls_score(features), self.bbox_pred(features)


class CascadeRoIHeads(RoIHeads):
    """``forward(features, proposals, image_shapes, targets)`` as torchvision's RoI heads
    (module docstring)."""

    def __init__(self, box_roi_pool: nn.Module, box_heads: Sequence[nn.Module],
                 num_classes: int, head_width: int, ious: Sequence[float],
                 stage_weights: Sequence[float], score_thresh: float, nms_thresh: float,
                 detections_per_img: int, mask_roi_pool: nn.Module | None = None,
                 mask_heads: Sequence[nn.Module] = (),
                 mask_predictors: Sequence[nn.Module] = ()) -> None:
        if not len(box_heads) == len(ious) == len(stage_weights) <= len(STAGE_CODER_WEIGHTS):
            raise ValueError("cascade: one box head, IoU and loss weight per stage (at most 3)")
        if mask_heads and not len(mask_heads) == len(mask_predictors) == len(box_heads):
            raise ValueError("cascade: one mask head and predictor per stage")
        # torchvision's single mask head / predictor stay unset: ours are per stage
        super().__init__(box_roi_pool, None, None, ious[0], ious[0], ROIS_PER_IMAGE,
                         POSITIVE_FRACTION, None, score_thresh, nms_thresh, detections_per_img)
        self.mask_roi_pool = mask_roi_pool if mask_heads else None
        self.mask_heads = nn.ModuleList(mask_heads)
        self.mask_predictors = nn.ModuleList(mask_predictors)
        self.box_heads = nn.ModuleList(box_heads)
        self.box_predictors = nn.ModuleList(CascadePredictor(head_width, num_classes)
                                            for _ in box_heads)
        self.matchers = [det_utils.Matcher(iou, iou, allow_low_quality_matches=False)
                         for iou in ious]
        self.coders = [det_utils.BoxCoder(w) for w in STAGE_CODER_WEIGHTS[:len(ious)]]
        self.stage_weights = tuple(stage_weights)

    def _stage(self, index: int, features: dict[str, torch.Tensor], rois: list[torch.Tensor],
               image_shapes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.box_roi_pool(features, rois, image_shapes)
        return self.box_predictors[index](self.box_heads[index](pooled))

    def has_mask(self) -> bool:
        return self.mask_roi_pool is not None and len(self.mask_heads) > 0

    def _refined(self, index: int, deltas: torch.Tensor, classes: torch.Tensor,
                 rois: list[torch.Tensor],
                 image_shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """The stage's regressed boxes per image, each RoI for class ``classes[i]``, clipped
        and without gradient: the next stage's RoIs."""
        boxes = self.coders[index].decode_single(_class_deltas(deltas.detach(), classes),
                                                 torch.cat(rois))
        return [box_ops.clip_boxes_to_image(b, shape)
                for b, shape in zip(boxes.split([len(r) for r in rois]), image_shapes,
                                    strict=True)]

    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_shapes: list[tuple[int, int]],
                targets: list[dict[str, torch.Tensor]] | None = None
                ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        if self.training:
            return [], self._train(features, proposals, image_shapes, targets)
        return self._infer(features, proposals, image_shapes), {}

    def _train(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
               image_shapes: list[tuple[int, int]],
               targets: list[dict[str, torch.Tensor]] | None) -> dict[str, torch.Tensor]:
        if targets is None:
            raise ValueError("cascade: training needs targets")
        gt_boxes = [t["boxes"] for t in targets]
        losses: dict[str, torch.Tensor] = {}
        rois = proposals
        for index, weight in enumerate(self.stage_weights):
            # torchvision's sampling, with this stage's IoU threshold and box coder
            self.proposal_matcher, self.box_coder = self.matchers[index], self.coders[index]
            rois, matched, labels, _ = self.select_training_samples(rois, targets)
            class_logits, deltas = self._stage(index, features, rois, image_shapes)
            flat_labels = torch.cat(labels)
            positive = torch.where(flat_labels > 0)[0]
            matched_gt = torch.cat([boxes[m] if len(boxes) else boxes.new_zeros((len(m), 4))
                                    for boxes, m in zip(gt_boxes, matched, strict=True)])
            decoded = self.coders[index].decode_single(
                _class_deltas(deltas[positive], flat_labels[positive]),
                torch.cat(rois)[positive])
            giou = generalized_box_iou_loss(decoded, matched_gt[positive], reduction="sum")
            losses[f"loss_cls_s{index}"] = weight * F.cross_entropy(class_logits, flat_labels)
            # mmdet averages over all sampled RoIs, as torchvision's fastrcnn_loss does
            losses[f"loss_box_s{index}"] = (weight * GIOU_WEIGHT * giou
                                            / max(flat_labels.numel(), 1))
            if self.has_mask():
                losses[f"loss_mask_s{index}"] = weight * self._mask_loss(
                    index, features, image_shapes, targets, rois, matched, labels)
            if index + 1 < len(self.stage_weights):
                # positives refine for their class, background RoIs for their best guess
                classes = torch.where(flat_labels > 0, flat_labels,
                                      class_logits.detach()[:, 1:].argmax(dim=1) + 1)
                rois = self._refined(index, deltas, classes, rois, image_shapes)
        return losses

    def _mask_logits(self, index: int, features: dict[str, torch.Tensor],
                     boxes: list[torch.Tensor],
                     image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        pooled = self.mask_roi_pool(features, boxes, image_shapes)
        return self.mask_predictors[index](self.mask_heads[index](pooled))

    def _mask_loss(self, index: int, features: dict[str, torch.Tensor],
                   image_shapes: list[tuple[int, int]], targets: list[dict[str, torch.Tensor]],
                   rois: list[torch.Tensor], matched: list[torch.Tensor],
                   labels: list[torch.Tensor]) -> torch.Tensor:
        positive = [torch.where(label > 0)[0] for label in labels]
        mask_rois = [r[p] for r, p in zip(rois, positive, strict=True)]
        mask_matched = [m[p] for m, p in zip(matched, positive, strict=True)]
        logits = self._mask_logits(index, features, mask_rois, image_shapes)
        return maskrcnn_loss(logits, mask_rois, [t["masks"] for t in targets],
                             [t["labels"] for t in targets], mask_matched)

    def _infer(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
               image_shapes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        rois, logits_sum = proposals, None
        for index in range(len(self.stage_weights)):
            class_logits, deltas = self._stage(index, features, rois, image_shapes)
            logits_sum = class_logits if logits_sum is None else logits_sum + class_logits
            if index + 1 < len(self.stage_weights):
                classes = class_logits[:, 1:].argmax(dim=1) + 1
                rois = self._refined(index, deltas, classes, rois, image_shapes)
        mean_logits = logits_sum / len(self.stage_weights)
        # the last stage's per-class boxes, scored by the mean logits: torchvision's NMS
        self.box_coder = self.coders[-1]
        boxes, scores, labels = self.postprocess_detections(mean_logits, deltas, rois,
                                                            image_shapes)
        result = [{"boxes": b, "labels": lab, "scores": s}
                  for b, s, lab in zip(boxes, scores, labels, strict=True)]
        if self.has_mask():
            stages = [maskrcnn_inference(self._mask_logits(i, features, boxes, image_shapes),
                                         labels) for i in range(len(self.mask_heads))]
            for image, r in enumerate(result):
                r["masks"] = torch.stack([probs[image] for probs in stages]).mean(dim=0)
        return result


def _class_deltas(deltas: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Each row's regression (4 numbers) for its class out of ``(N, 4 x classes)``."""
    rows = deltas.view(len(deltas), -1, 4)
    return rows[torch.arange(len(deltas), device=deltas.device), classes]
