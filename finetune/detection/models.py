"""Detectors on any registered encoder, from torchvision's detection models and ops:

- ``mask_rcnn``: :class:`torchvision.models.detection.MaskRCNN` on FPN P2-P6 (P6 max-pooled
  from P5), the box head mmdet's Mask R-CNN recipes use (two shared fcs) or the 4conv1fc one;
- ``retinanet``: :class:`torchvision.models.detection.RetinaNet` on P3-P7 with P6 and P7
  computed from C5 (mmdet's ``add_extra_convs='on_input'``), K sigmoid classes;
- ``cascade_mask_rcnn``: Mask R-CNN whose RoI heads are :class:`CascadeRoIHeads`.

The backbone is :class:`finetune.backbone.Backbone` (timm features at strides 4-32 + the
official per-level LayerNorm) followed by torchvision's :class:`FeaturePyramidNetwork`.

Images reach the model already augmented (multi-scale resize, crop, flip happen in the data
stream, seeded per image so that resuming is exact): :class:`DetectionTransform` therefore only
normalises and pads the batch in training, and resizes to the test scale (short side 800, long
side at most 1333) in evaluation, where torchvision maps boxes and masks back to the original
image.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN, RetinaNet
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from finetune.backbone import Backbone
from finetune.config import DetectionConfig, DetectionModel
from finetune.detection.cascade import CascadeRoIHeads
from pretrain.encoders.spec import ModelSpec

# The R-CNN heads' RoI features: 7x7 per box (box head), 14x14 per mask (mask head).
BOX_ROI = 7


class DetectionTransform(GeneralizedRCNNTransform):
    """Normalise + pad to a multiple of 32 always; resize only in evaluation (module
    docstring). torchvision's own transform would draw a training scale from the global RNG
    and resize again."""

    def resize(self, image: torch.Tensor,
               target: dict[str, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        if self.training:
            return image, target
        return super().resize(image, target)


class DetectionBackbone(nn.Module):
    """Encoder features (+ per-level norms) -> FPN: ``forward(images) -> OrderedDict`` of
    pyramid levels, as torchvision's detectors expect, with ``out_channels``."""

    def __init__(self, body: Backbone, out_channels: int, retinanet: bool) -> None:
        super().__init__()
        self.body = body
        extra = (LastLevelP6P7(body.channels[-1], out_channels) if retinanet
                 else LastLevelMaxPool())
        self.fpn = FeaturePyramidNetwork(body.channels, out_channels, extra_blocks=extra)
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = self.body(images)
        levels = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))
        # fp32 out of autocast: torchvision's anchor generator takes the levels' dtype, and
        # bf16 anchors would be 8 px coarse at x = 1333 (the heads' convs autocast anyway)
        return OrderedDict((name, level.float()) for name, level in levels.items())


def box_head(model: DetectionModel) -> nn.Module:
    """The R-CNN box head: mmdet's Shared2FCBBoxHead (``2fc``) or ConvFCBBoxHead with four
    BatchNorm convs and one fc (``4conv1fc``); ``model.fc_channels`` wide."""
    size = (model.fpn_channels, BOX_ROI, BOX_ROI)
    if model.resolved_box_head() == "2fc":
        return FastRCNNConvFCHead(size, [], [model.fc_channels] * 2)
    return FastRCNNConvFCHead(size, [model.head_channels] * 4, [model.fc_channels],
                              norm_layer=nn.BatchNorm2d)


def mask_head(model: DetectionModel) -> nn.Module:
    """mmdet's FCNMaskHead trunk: four 3x3 convs, ``model.head_channels`` wide."""
    return MaskRCNNHeads(model.fpn_channels, [model.head_channels] * 4, 1)


def mask_predictor(model: DetectionModel, num_classes: int) -> nn.Module:
    """2x deconvolution + one mask logit map per class (background included, torchvision's
    layout)."""
    return MaskRCNNPredictor(model.head_channels, model.head_channels, num_classes + 1)


def build_detector(cfg: DetectionConfig, spec: ModelSpec, weights: str | None,
                   num_classes: int) -> nn.Module:
    """The torchvision detector of ``cfg.model.kind`` for ``num_classes`` object classes
    (background excluded) on the encoder of ``spec`` with ``weights``."""
    model, evaluation, data = cfg.model, cfg.eval, cfg.data
    body = Backbone(spec, weights, model.out_indices, drop_path=cfg.encoder.drop_path,
                    grad_checkpointing=cfg.encoder.grad_checkpointing)
    backbone = DetectionBackbone(body, model.fpn_channels, model.kind == "retinanet")
    common: dict[str, Any] = {"min_size": evaluation.min_size, "max_size": evaluation.max_size,
                              "image_mean": list(data.mean), "image_std": list(data.std)}
    if model.kind == "retinanet":
        detector: nn.Module = RetinaNet(
            backbone, num_classes=num_classes, score_thresh=evaluation.score_thresh,
            nms_thresh=evaluation.nms_thresh, detections_per_img=evaluation.detections,
            topk_candidates=1000, **common)
    else:
        detector = MaskRCNN(
            backbone, num_classes=None, box_head=box_head(model),
            box_predictor=FastRCNNPredictor(model.fc_channels, num_classes + 1),
            mask_head=mask_head(model), mask_predictor=mask_predictor(model, num_classes),
            box_score_thresh=evaluation.score_thresh, box_nms_thresh=evaluation.nms_thresh,
            box_detections_per_img=evaluation.detections, **common)
        if model.kind == "cascade_mask_rcnn":
            roi = detector.roi_heads
            detector.roi_heads = CascadeRoIHeads(
                box_roi_pool=roi.box_roi_pool,
                box_heads=[box_head(model) for _ in model.cascade_ious],
                num_classes=num_classes + 1, head_width=model.fc_channels,
                ious=model.cascade_ious, stage_weights=model.cascade_weights,
                score_thresh=evaluation.score_thresh, nms_thresh=evaluation.nms_thresh,
                detections_per_img=evaluation.detections, mask_roi_pool=roi.mask_roi_pool,
                mask_heads=[roi.mask_head] + [mask_head(model) for _ in model.cascade_ious[1:]],
                mask_predictors=[roi.mask_predictor] + [mask_predictor(model, num_classes)
                                                        for _ in model.cascade_ious[1:]])
    detector.transform = DetectionTransform(size_divisible=32, **common)
    return detector


class DetectionModule(nn.Module):
    """Detector + the batch protocol of the shared trainer:
    ``forward({"images", "targets"}) -> {"loss", <each of the detector's losses>}`` and
    :meth:`predict` for evaluation. Labels are 1..K (0 = background) everywhere outside;
    RetinaNet, whose K classes are sigmoids without a background, sees 0..K-1."""

    def __init__(self, detector: nn.Module, retinanet: bool,
                 autocast: torch.dtype | None = None) -> None:
        super().__init__()
        self.detector = detector
        self.label_offset = 1 if retinanet else 0
        self.has_masks = not retinanet
        self.autocast = autocast  # bf16 matmuls and convs over fp32 weights (Task.autocast)

    def _autocast(self, device: torch.device) -> torch.autocast:
        return torch.autocast(device.type, dtype=self.autocast or torch.bfloat16,
                              enabled=self.autocast is not None)

    @property
    def backbone(self) -> DetectionBackbone:
        return self.detector.backbone

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = [as_float(image) for image in batch["images"]]
        targets = [self._target(t) for t in batch["targets"]]
        with self._autocast(images[0].device):
            losses = self.detector(images, targets)
        losses = {name: value.float() for name, value in losses.items()}
        return {"loss": sum(losses.values()), **losses}

    def predict(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Detections in each image's own pixel frame: ``boxes`` (xyxy), ``scores``,
        ``labels`` (1..K) and, for the R-CNNs, ``masks`` (N, 1, H, W) probabilities."""
        with self._autocast(images[0].device):
            outputs = self.detector([as_float(image) for image in images])
        for output in outputs:
            output["labels"] = output["labels"] + self.label_offset
        return outputs

    def _target(self, target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {"boxes": target["boxes"].float(), "labels": target["labels"] - self.label_offset}
        if self.has_masks:
            out["masks"] = target["masks"]
        return out


def as_float(image: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float 0..1 (what the detector's normalisation expects)."""
    return image.float().div_(255.0) if image.dtype == torch.uint8 else image.float()
