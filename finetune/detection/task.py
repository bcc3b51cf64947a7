"""COCO object detection and instance segmentation as a task of the shared trainer: Mask
R-CNN, RetinaNet or Cascade Mask R-CNN on any registered encoder (:mod:`.models`), trained on
COCO's json + image folders (:mod:`.data`), judged by COCOeval (:mod:`.evaluate`).

Parameter groups follow the official mmdet configs of DaViT / DAT++ / DWNet: AdamW, no weight
decay on norms, biases and the encoders' relative-position tables (``no_weight_decay``);
layer-wise lr decay over the encoder optional (``encoder.layer_decay``), the heads at full lr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

from data_tools.files import atomic_torch_save
from finetune.config import DetectionConfig
from finetune.detection.checks import check_detection_inputs, check_same_categories
from finetune.detection.coco import CocoIndex
from finetune.detection.data import CocoTrainStream, CocoValSplit, DetectionAugment
from finetune.detection.evaluate import DetectionEvaluator
from finetune.detection.models import DetectionModule, build_detector
from finetune.segmentation.models import average_batchnorm_statistics
from finetune.transfer import config_for_checkpoint, load_task_weights, resolve_spec
from pretrain.encoders.spec import SPEC_KEY, ModelSpec, read_spec
from pretrain.encoders.weights import read_state_dict
from pretrain.engine.eval_slices import sliced_loader
from pretrain.engine.stream import StreamState, TrainLoader
from pretrain.engine.task import Evaluator, Task

BACKBONE_PREFIX = "detector.backbone.body.body."  # the encoder trunk inside DetectionModule
EXPORT_NAME = "detector.pt"
RESULTS_NAME = "detections.json"


def build_detection_module(cfg: DetectionConfig, spec: ModelSpec, weights: str | None,
                           num_classes: int) -> DetectionModule:
    autocast = torch.bfloat16 if cfg.deepspeed.precision == "bf16" else None
    return DetectionModule(build_detector(cfg, spec, weights, num_classes),
                           cfg.model.kind == "retinanet", autocast)


class DetectionTask(Task):
    label = "detection"
    input_keys = ()  # uint8 images; the module autocasts (Task.autocast)
    autocast = True
    eval_only_export = EXPORT_NAME
    cfg: DetectionConfig

    def __init__(self, cfg: DetectionConfig,
                 categories: tuple[list[int], str] | None = None) -> None:
        """``categories``: (category ids, where they come from) when the training json is not
        read (``--eval-only``: the checkpoint or the validation json says)."""
        super().__init__(cfg)
        encoder, data = cfg.encoder, cfg.data
        self.spec = resolve_spec(encoder.weights, encoder.name, encoder.overrides)
        self.train_index: CocoIndex | None = None
        if categories is None:
            self.train_index = CocoIndex(data.path(data.train_annotations),
                                         data.path(data.train_images))
            self.train_ids = self.train_index.training_image_ids()
            if not self.train_ids:
                raise ValueError(f"{data.path(data.train_annotations)}: no image has a usable "
                                 "(non-crowd, non-degenerate) annotation")
            categories = (self.train_index.category_ids,
                          f"the training json's ({self.train_index.annotation_file})")
        self.category_ids, self.categories_from = list(categories[0]), categories[1]
        self.num_classes = len(self.category_ids)

    def build_module(self) -> nn.Module:
        from pretrain.engine import distributed

        module = build_detection_module(self.cfg, self.spec, self.cfg.encoder.weights,
                                        self.num_classes)
        if self.cfg.model.sync_bn and torch.cuda.is_available() and distributed.world_size() > 1:
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)  # the 4conv1fc heads
        return module

    def param_groups(self, module: nn.Module) -> list[dict[str, Any]]:
        optimizer = self.cfg.optimizer
        body = module.backbone.body.body
        no_decay = set(getattr(body, "no_weight_decay", lambda: set())() or set())
        layer_decay = self.cfg.encoder.layer_decay
        if layer_decay is None:
            groups = param_groups_weight_decay(
                module, optimizer.weight_decay,
                no_weight_decay_list=[f"{BACKBONE_PREFIX}{p}" for p in no_decay])
        else:
            # timm's layer groups over the encoder; every other parameter at full lr
            groups = param_groups_layer_decay(body, optimizer.weight_decay, no_decay,
                                              layer_decay=layer_decay)
            trunk = {id(p) for p in body.parameters()}
            rest = [(n, p) for n, p in module.named_parameters()
                    if id(p) not in trunk and p.requires_grad]
            groups += [{"params": [p for n, p in rest if p.ndim > 1 and not n.endswith(".bias")],
                        "weight_decay": optimizer.weight_decay},
                       {"params": [p for n, p in rest if p.ndim <= 1 or n.endswith(".bias")],
                        "weight_decay": 0.0}]
        for group in groups:
            group["lr"] = optimizer.lr * group.pop("lr_scale", 1.0)
            group.pop("param_names", None)
        return [g for g in groups if g["params"]]

    def after_optimizer_step(self, module: nn.Module, step: int) -> None:
        average_batchnorm_statistics(module)

    def epoch_samples(self) -> int | None:
        return self.cfg.data.epoch_samples or len(self.train_ids)

    def build_loader(self, rank: int, state: StreamState) -> TrainLoader:
        from pretrain.engine import distributed

        data = self.cfg.data
        augment = DetectionAugment(data.policy, data.scales, data.max_size, data.flip,
                                   data.crop_scales, data.crop_size)
        stream = CocoTrainStream(self.train_index, augment, data.batch_size,
                                 self.cfg.train.seed, rank, distributed.world_size(),
                                 data.workers, state, group_by_aspect=data.group_by_aspect,
                                 source=f"data.train_images {data.path(data.train_images)}",
                                 skips=self.skip_log(rank))
        return TrainLoader(stream, data.workers)

    def val_index(self) -> CocoIndex:
        data = self.cfg.data
        index = CocoIndex(data.path(data.val_annotations), data.path(data.val_images))
        check_same_categories(index, self.category_ids, self.categories_from)
        return index

    def evaluator(self, rank: int, world_size: int) -> Evaluator:
        index = self.val_index()
        split = CocoValSplit(index, rank, world_size, self.skip_log(rank))
        results = None if self.run_dir is None else self.run_dir / RESULTS_NAME
        return DetectionEvaluator(sliced_loader(split, self.cfg.data.workers), index,
                                  self.cfg, results)

    def flops_per_sample(self) -> float:
        """The encoder + FPN at the largest training scale (square): the heads' cost depends
        on the number of proposals and is left out."""
        from pretrain.engine.flops import image_model_train_flops

        return image_model_train_flops(
            lambda: build_detection_module(self.cfg, self.spec, None,
                                           self.num_classes).backbone,
            max(self.cfg.data.scales))

    def export(self, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        """``detector.pt``: the fp32 detector (torchvision keys under ``detector.``), its
        category ids and names, and the spec that rebuilds it."""
        atomic_torch_save({"state_dict": state_dict, SPEC_KEY: self.export_spec().to_dict()},
                          out_dir / EXPORT_NAME)

    def export_spec(self) -> ModelSpec:
        index = self.train_index
        return ModelSpec(self.spec.timm_name, self.spec.overrides,
                         num_classes=self.num_classes, task="detection",
                         options={"kind": self.cfg.model.kind,
                                  "category_ids": list(index.category_ids),
                                  "classes": list(index.category_names)})

    @classmethod
    def check_inputs(cls, cfg: DetectionConfig) -> None:
        check_detection_inputs(cfg)

    @classmethod
    def for_checkpoint(cls, cfg: DetectionConfig, checkpoint: Path) -> DetectionTask:
        """Scoring ``checkpoint`` (an exported ``detector.pt``, or any file with this config's
        detector keys) needs no training json: the categories are those the checkpoint
        records, else the validation json's, in its order."""
        spec = read_spec(checkpoint)
        recorded = spec.options.get("category_ids") if spec is not None else None
        if recorded is not None:
            categories = (recorded, f"those {checkpoint} was trained on")
        else:
            data = cfg.data
            categories = (CocoIndex(data.path(data.val_annotations),
                                    data.path(data.val_images)).category_ids,
                          "the validation json's")
        return cls(config_for_checkpoint(cfg, checkpoint), categories)

    def load_checkpoint(self, checkpoint: Path) -> nn.Module:
        module = build_detection_module(self.cfg, self.spec, None, self.num_classes)
        load_task_weights(module, read_state_dict(checkpoint), checkpoint, "detector",
                          read_spec(checkpoint))
        return module
