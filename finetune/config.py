"""Fine-tuning job schemas: one per task, discriminated by ``task:``, built from the sections
every job shares (:class:`pretrain.config.JobConfig`: train, optimizer, schedule, eval,
deepspeed, log, checkpoint) plus the task's own ``encoder``, ``data`` and ``loss``.

``load_config(FinetuneConfig, path)`` reads any of them: ``FinetuneConfig`` is their
discriminated union, and the file's ``task:`` picks the schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from pretrain.engine.config import EvalConfig, JobConfig, Section, StreamConfig, tagged_union
from pretrain.engine.images import OPENAI_MEAN, OPENAI_STD


class EncoderConfig(Section):
    # Where the weights come from: an export of our pretraining (encoder.pt), or any checkpoint
    # the weight loader understands; null trains from scratch.
    weights: str | None = None
    # timm name (+ overrides) when `weights` does not say how to build the encoder.
    name: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)
    drop_path: float = Field(0.1, ge=0.0, lt=1.0)
    grad_checkpointing: bool = False
    # Layer-wise lr decay (timm's groups): layer i of n gets lr x layer_decay ** (n - i).
    layer_decay: float | None = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _defined(self) -> EncoderConfig:
        if self.weights is None and self.name is None:
            raise ValueError("set encoder.weights (an export) or encoder.name")
        return self


class ClassificationData(StreamConfig):
    # "shards": train is a shard pattern or mixture (as in pretraining), val a shard pattern;
    # "imagefolder": both are ImageFolder roots (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG), the
    # class index being the position of the folder's name in `classes` (default: sorted names).
    layout: Literal["shards", "imagefolder"] = "shards"
    train: str
    val: str
    label_key: str = "cls"  # field of the sample's .json holding the label (name or index)
    classes: list[str] | None = None  # names, when labels are names; index order = class index
    num_classes: int = Field(..., ge=2)
    image_size: int = Field(224, ge=32)
    randaugment: str | None = "rand-m9-mstd0.5-inc1"
    random_erasing: float = Field(0.25, ge=0, le=1)
    scale: tuple[float, float] = (0.08, 1.0)
    crop_pct: float = Field(0.875, gt=0, le=1)  # evaluation: resize to size/crop_pct, centre crop
    # normalisation: our encoders are pretrained with OpenAI's statistics; the papers' ImageNet
    # recipes (and their released weights) use (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225)
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    mixup: float = Field(0.0, ge=0)  # alpha; 0 disables
    cutmix: float = Field(0.0, ge=0)  # alpha; 0 disables

    @model_validator(mode="after")
    def _classes_match(self) -> ClassificationData:
        if self.classes is not None and len(self.classes) != self.num_classes:
            raise ValueError("data.classes must list data.num_classes names")
        return self


class ClassificationLoss(Section):
    label_smoothing: float = Field(0.1, ge=0, lt=1)


class EmaConfig(Section):
    """An exponential moving average of the weights (timm's ``ModelEmaV3``, kept in fp32),
    evaluated beside the model (``ema_top1``, ``ema_top5``) and resumed with the checkpoint."""

    enabled: bool = False
    decay: float = Field(0.9998, gt=0, lt=1)
    # timm's decay warmup (1 - (1 + step) ** -2/3, capped at `decay`): early averages follow the
    # model instead of the random initialisation
    warmup: bool = True


class ClassificationConfig(JobConfig):
    task: Literal["classification"]
    encoder: EncoderConfig
    data: ClassificationData
    loss: ClassificationLoss = Field(default_factory=ClassificationLoss)
    eval: EvalConfig = Field(default_factory=lambda: EvalConfig(best_metric="top1"))
    ema: EmaConfig = Field(default_factory=EmaConfig)
    # Linear probe: the encoder stays frozen (and in eval mode); only the linear classifier on
    # its pooled features trains, without weight decay.
    linear_probe: bool = False

    @model_validator(mode="after")
    def _supported(self) -> ClassificationConfig:
        if self.ema.enabled and self.deepspeed.zero_stage == 3:
            raise ValueError("ema.enabled: the EMA keeps a full copy of the weights on every "
                             "rank, which ZeRO-3 partitions; use deepspeed.zero_stage 0, 1 or 2")
        metric = self.eval.best_metric or ""
        if metric.startswith("ema_") and not self.ema.enabled:
            raise ValueError(f"eval.best_metric {metric!r} needs ema.enabled: true")
        data = self.data
        if self.linear_probe and (data.randaugment or data.random_erasing or data.mixup
                                  or data.cutmix):
            raise ValueError("linear_probe: the probe recipe augments with crop and flip only; "
                             "set data.randaugment: null, data.random_erasing: 0, data.mixup: 0 "
                             "and data.cutmix: 0")
        return self


class SegmentationModel(Section):
    """UPerNet (+ auxiliary FCN head) or Semantic FPN on the encoder's stride 4-32 features."""

    kind: Literal["upernet", "semantic_fpn"] = "upernet"
    decoder_channels: int = Field(512, ge=8)  # UPerNet decoder / Semantic FPN neck width
    head_channels: int = Field(128, ge=8)  # Semantic FPN head (mmseg's FPNHead channels)
    dropout: float = Field(0.1, ge=0, lt=1)  # before each classifier
    aux_weight: float = Field(0.4, ge=0)  # UPerNet's auxiliary FCN head on stride 16; 0: none
    aux_channels: int = Field(256, ge=8)
    out_indices: tuple[int, int, int, int] = (0, 1, 2, 3)
    sync_bn: bool = True  # BatchNorm over all ranks (on GPUs; CPU ranks keep their own)


class SegmentationData(StreamConfig):
    # <root>/images/<split>/*.jpg and <root>/annotations/<split>/*.png (ADEChallengeData2016)
    root: str
    train_split: str = "training"
    val_split: str = "validation"
    image_dir: str = "images"
    label_dir: str = "annotations"
    num_classes: int = Field(150, ge=2)
    ignore_index: int = Field(255, ge=0)
    reduce_zero_label: bool = True  # ADE20K: 0 ("other") -> ignore_index, k -> k - 1
    # names in index order; "ade20k": the 150 names shipped with the package; null: 0..K-1
    classes: Literal["ade20k"] | list[str] | None = None
    crop_size: int = Field(512, ge=32)
    scale: tuple[int, int] = (2048, 512)  # rescale to fit (long, short) x a random ratio
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = Field(0.75, gt=0, le=1)  # 1 disables the crop retries
    flip: float = Field(0.5, ge=0, le=1)
    photometric: bool = True
    # our encoders are pretrained with OpenAI's statistics; official ImageNet checkpoints
    # were trained with (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225)
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    @model_validator(mode="after")
    def _classes_match(self) -> SegmentationData:
        if isinstance(self.classes, list) and len(self.classes) != self.num_classes:
            raise ValueError("data.classes must list data.num_classes names")
        if self.classes == "ade20k" and self.num_classes != 150:
            raise ValueError("data.classes: ade20k names 150 classes, data.num_classes differs")
        if self.ignore_index < self.num_classes:
            raise ValueError("data.ignore_index must not be a class index (< num_classes)")
        if self.ratio_range[0] > self.ratio_range[1] or self.ratio_range[0] <= 0:
            raise ValueError("data.ratio_range must be (low, high) with 0 < low <= high")
        return self


class SegmentationEval(EvalConfig):
    """Inference at evaluation: ``whole`` or ``slide`` windows on the image rescaled to fit
    ``scale``; more than one ratio, or ``flip``, averages the probabilities of every view."""

    best_metric: str | None = "mIoU"
    mode: Literal["whole", "slide"] = "whole"
    scale: tuple[int, int] = (2048, 512)
    crop: int = Field(512, ge=32)
    stride: int = Field(341, ge=1)
    ratios: list[float] = Field(default_factory=lambda: [1.0])
    flip: bool = False
    predictions_dir: str | None = None  # index PNGs (dataset label space) of every image
    overlays: int = Field(0, ge=0)  # coloured overlays of the first this many images

    @model_validator(mode="after")
    def _ratios(self) -> SegmentationEval:
        if not self.ratios or min(self.ratios) <= 0:
            raise ValueError("eval.ratios must list positive scale ratios")
        if self.overlays and self.predictions_dir is None:
            raise ValueError("eval.overlays: set eval.predictions_dir (they are written there)")
        return self


class SegmentationConfig(JobConfig):
    task: Literal["segmentation"]
    encoder: EncoderConfig
    model: SegmentationModel = Field(default_factory=SegmentationModel)
    data: SegmentationData
    eval: SegmentationEval = Field(default_factory=SegmentationEval)

    @model_validator(mode="after")
    def _supported(self) -> SegmentationConfig:
        if self.encoder.layer_decay is not None:
            raise ValueError("encoder.layer_decay: the segmentation recipes use none")
        return self


class DetectionModel(Section):
    """Mask R-CNN (FPN P2-P6), RetinaNet (P3-P7, P6 from C5) or Cascade Mask R-CNN (three
    stages at IoU 0.5 / 0.6 / 0.7) on the encoder's features, torchvision's heads and ops."""

    kind: Literal["mask_rcnn", "retinanet", "cascade_mask_rcnn"] = "mask_rcnn"
    fpn_channels: int = Field(256, ge=8)
    head_channels: int = Field(256, ge=8)  # convs of the 4conv1fc box head and the mask head
    fc_channels: int = Field(1024, ge=8)  # the box heads' fully connected layers
    # R-CNN box heads: "2fc" (mmdet's Shared2FCBBoxHead, the Mask R-CNN recipes) or "4conv1fc"
    # (four 3x3 convs with BatchNorm + one fc: the DWNet / Swin Cascade recipes); null picks
    # the recipe's (2fc for Mask R-CNN, 4conv1fc for Cascade)
    box_head: Literal["2fc", "4conv1fc"] | None = None
    cascade_ious: tuple[float, float, float] = (0.5, 0.6, 0.7)
    cascade_weights: tuple[float, float, float] = (1.0, 0.5, 0.25)  # stage loss weights
    sync_bn: bool = True  # the 4conv1fc heads' BatchNorm over all ranks (on GPUs)

    def resolved_box_head(self) -> str:
        return self.box_head or ("4conv1fc" if self.kind == "cascade_mask_rcnn" else "2fc")

    @property
    def has_masks(self) -> bool:
        return self.kind != "retinanet"

    @property
    def out_indices(self) -> tuple[int, ...]:
        """Encoder stages feeding the FPN: C2-C5 for the R-CNNs, C3-C5 for RetinaNet."""
        return (1, 2, 3) if self.kind == "retinanet" else (0, 1, 2, 3)


class DetectionData(StreamConfig):
    """COCO as distributed: instances json + image folder per split; relative paths are under
    ``root``. ``policy`` is the training augmentation: ``multiscale`` (flip + short side drawn
    from ``scales``, long side <= ``max_size``), ``crop`` (the 3x recipes' two branches: that,
    or resize to ``crop_scales`` + random crop in ``crop_size`` + resize to ``scales``) or
    ``none`` (flip only; tests)."""

    root: str = "."
    train_annotations: str = "annotations/instances_train2017.json"
    train_images: str = "train2017"
    val_annotations: str = "annotations/instances_val2017.json"
    val_images: str = "val2017"
    policy: Literal["multiscale", "crop", "none"] = "multiscale"
    scales: list[int] = Field(default_factory=lambda: [800])
    max_size: int = Field(1333, ge=32)
    crop_scales: list[int] = Field(default_factory=lambda: [400, 500, 600])
    crop_size: tuple[int, int] = (384, 600)
    flip: float = Field(0.5, ge=0, le=1)
    group_by_aspect: bool = True
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    def path(self, relative: str) -> str:
        return str(Path(self.root) / relative)

    @model_validator(mode="after")
    def _sizes(self) -> DetectionData:
        if not self.scales or min(self.scales) < 32:
            raise ValueError("data.scales must list short sides of at least 32 px")
        if self.crop_size[0] > self.crop_size[1]:
            raise ValueError("data.crop_size must be (low, high)")
        return self


class DetectionEval(EvalConfig):
    """Single-scale inference of the papers: short side ``min_size``, long side at most
    ``max_size``; boxes over ``score_thresh`` after per-class NMS at ``nms_thresh``, the best
    ``detections`` per image, masks binarised at ``mask_thresh``."""

    best_metric: str | None = "bbox/AP"
    min_size: int = Field(800, ge=32)
    max_size: int = Field(1333, ge=32)
    score_thresh: float = Field(0.05, ge=0, lt=1)
    nms_thresh: float = Field(0.5, gt=0, le=1)
    detections: int = Field(100, ge=1)
    mask_thresh: float = Field(0.5, gt=0, lt=1)


class DetectionConfig(JobConfig):
    task: Literal["detection"]
    encoder: EncoderConfig
    model: DetectionModel = Field(default_factory=DetectionModel)
    data: DetectionData
    eval: DetectionEval = Field(default_factory=DetectionEval)

    @model_validator(mode="after")
    def _supported(self) -> DetectionConfig:
        metric = self.eval.best_metric or ""
        if metric.startswith("segm/") and not self.model.has_masks:
            raise ValueError(f"eval.best_metric {metric!r}: RetinaNet predicts no masks")
        return self


# The fine-tuning schema: pydantic's discriminated union of the tasks' schemas on ``task:``.
# ``load_config(FinetuneConfig, path)`` returns the task's config (ClassificationConfig, ...).
FinetuneConfig = tagged_union("task", ClassificationConfig, SegmentationConfig, DetectionConfig)
