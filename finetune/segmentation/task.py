"""Semantic segmentation as a task of the shared trainer: UPerNet (+ auxiliary FCN head) or
Semantic FPN on any registered encoder, trained on image / mask folders, judged by mIoU.

Parameter groups follow the official mmseg configs of DaViT / DAT++ / DWNet: AdamW, no weight
decay on norms, biases and the encoders' relative-position tables (their ``no_weight_decay``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from data_tools.files import atomic_torch_save
from finetune.backbone import Backbone
from finetune.config import SegmentationConfig, SegmentationData
from finetune.segmentation.checks import check_segmentation_inputs
from finetune.segmentation.data import (
    FolderSplit,
    FolderStream,
    LoadPair,
    TrainAugment,
    list_samples,
)
from finetune.segmentation.evaluate import SegmentationEvaluator, class_names
from finetune.segmentation.models import Segmenter, average_batchnorm_statistics, build_segmenter
from finetune.transfer import config_for_checkpoint, load_task_weights, resolve_spec
from pretrain.encoders.spec import SPEC_KEY, ModelSpec, read_spec
from pretrain.encoders.weights import read_state_dict
from pretrain.engine.eval_slices import sliced_loader
from pretrain.engine.flops import image_model_train_flops
from pretrain.engine.stream import StreamState, TrainLoader
from pretrain.engine.task import Batch, Evaluator, LossOutput, Task

MODEL_PREFIX = "model."
EXPORT_NAME = "segmenter.pt"


def split_source(data: SegmentationData, split: str) -> str:
    """How messages name a split: the config fields that point at it and its image folder."""
    field = "data.train_split" if split == data.train_split else "data.val_split"
    return f"{field} {split!r} ({Path(data.root) / data.image_dir / split})"


def masked_cross_entropy(logits: torch.Tensor, label: torch.Tensor,
                         ignore_index: int) -> torch.Tensor:
    """Mean cross-entropy over the labelled pixels (0, not NaN, for a crop without any)."""
    total = nn.functional.cross_entropy(logits, label, ignore_index=ignore_index,
                                        reduction="sum")
    return total / (label != ignore_index).sum().clamp(min=1)


class SegmentationModule(nn.Module):
    """Segmenter + losses: ``forward({"image", "label"}) -> {"loss", "loss_decode",
    "loss_aux"}``; :meth:`logits` is what inference calls."""

    def __init__(self, model: Segmenter, ignore_index: int, aux_weight: float) -> None:
        super().__init__()
        self.model = model
        self.ignore_index, self.aux_weight = ignore_index, aux_weight

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.logits(image)

    def forward(self, batch: Batch) -> LossOutput:
        label = batch["label"].long()
        main, aux = self.model.forward_train(batch["image"])
        loss_decode = masked_cross_entropy(main, label, self.ignore_index)
        if aux is None:
            return {"loss": loss_decode}
        loss_aux = masked_cross_entropy(aux, label, self.ignore_index)
        return {"loss": loss_decode + self.aux_weight * loss_aux, "loss_decode": loss_decode,
                "loss_aux": loss_aux}


def build_segmentation_module(cfg: SegmentationConfig, spec: ModelSpec,
                              weights: str | None) -> SegmentationModule:
    encoder, model = cfg.encoder, cfg.model
    backbone = Backbone(spec, weights, model.out_indices, drop_path=encoder.drop_path,
                        grad_checkpointing=encoder.grad_checkpointing)
    segmenter = build_segmenter(model.kind, backbone, cfg.data.num_classes,
                                model.decoder_channels, model.dropout, model.aux_weight,
                                model.aux_channels, model.head_channels)
    return SegmentationModule(segmenter, cfg.data.ignore_index, model.aux_weight)


class SegmentationTask(Task):
    label = "segmentation"
    eval_only_export = EXPORT_NAME
    cfg: SegmentationConfig

    def __init__(self, cfg: SegmentationConfig) -> None:
        super().__init__(cfg)
        encoder = cfg.encoder
        self.spec = resolve_spec(encoder.weights, encoder.name, encoder.overrides)
        data = cfg.data
        self.load = LoadPair(data.reduce_zero_label, data.ignore_index, data.num_classes)
        self._train_samples: list | None = None

    @property
    def train_samples(self) -> list:
        """The training split, listed when first needed (``--eval-only`` never needs it)."""
        if self._train_samples is None:
            data = self.cfg.data
            self._train_samples = list_samples(data.root, data.train_split, data.image_dir,
                                               data.label_dir)
        return self._train_samples

    def build_module(self) -> nn.Module:
        from pretrain.engine import distributed

        module = build_segmentation_module(self.cfg, self.spec, self.cfg.encoder.weights)
        if self.cfg.model.sync_bn and torch.cuda.is_available() and distributed.world_size() > 1:
            # mmseg's recipes normalise over the global batch (SyncBN): 2 images per GPU give
            # poor per-rank statistics, and a 1-image rank none at the PSP's 1x1 pooling.
            # SyncBatchNorm is CUDA-only, so CPU runs keep per-rank BatchNorm.
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return module

    def param_groups(self, module: nn.Module) -> list[dict[str, Any]]:
        body = module.model.backbone.body
        patterns = getattr(body, "no_weight_decay", lambda: set())() or set()
        no_decay = [f"{MODEL_PREFIX}backbone.body.{p}" for p in patterns]
        groups = param_groups_weight_decay(module, self.cfg.optimizer.weight_decay,
                                           no_weight_decay_list=no_decay)
        for group in groups:
            group["lr"] = self.cfg.optimizer.lr
        return groups

    def after_optimizer_step(self, module: nn.Module, step: int) -> None:
        average_batchnorm_statistics(module)

    def epoch_samples(self) -> int | None:
        return self.cfg.data.epoch_samples or len(self.train_samples)

    def build_loader(self, rank: int, state: StreamState) -> TrainLoader:
        from pretrain.engine import distributed

        data = self.cfg.data
        augment = TrainAugment(data.crop_size, data.scale, data.ratio_range, data.cat_max_ratio,
                               data.flip, data.photometric, data.mean, data.std,
                               data.ignore_index)
        stream = FolderStream(self.train_samples, self.load, augment, data.batch_size,
                              self.cfg.train.seed, rank, distributed.world_size(),
                              data.workers, state, source=split_source(data, data.train_split),
                              skips=self.skip_log(rank))
        return TrainLoader(stream, data.workers)

    def evaluator(self, rank: int, world_size: int) -> Evaluator:
        data = self.cfg.data
        samples = list_samples(data.root, data.val_split, data.image_dir, data.label_dir)
        split = FolderSplit(samples, self.load, data.mean, data.std, rank, world_size,
                            self.skip_log(rank))
        return SegmentationEvaluator(sliced_loader(split, data.workers), self.cfg, samples)

    def flops_per_sample(self) -> float:
        size = self.cfg.data.crop_size
        # eval mode: with one image, the PSP's 1x1 pooled BatchNorm has no batch statistics
        return image_model_train_flops(
            lambda: build_segmentation_module(self.cfg, self.spec, None).model.eval(), size)

    def export(self, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        """``segmenter.pt``: the fp32 segmenter and the spec that rebuilds it."""
        weights = {k[len(MODEL_PREFIX):]: v for k, v in state_dict.items()
                   if k.startswith(MODEL_PREFIX)}
        atomic_torch_save({"state_dict": weights, SPEC_KEY: self.export_spec().to_dict()},
                          out_dir / EXPORT_NAME)

    def export_spec(self) -> ModelSpec:
        model = self.cfg.model
        return ModelSpec(self.spec.timm_name, self.spec.overrides,
                         num_classes=self.cfg.data.num_classes, task="segmentation",
                         options={"kind": model.kind, "decoder_channels": model.decoder_channels,
                                  "head_channels": model.head_channels,
                                  "aux_channels": model.aux_channels,
                                  "aux_weight": model.aux_weight,
                                  "out_indices": list(model.out_indices),
                                  "classes": class_names(self.cfg.data)})

    @classmethod
    def check_inputs(cls, cfg: SegmentationConfig) -> None:
        check_segmentation_inputs(cfg)

    @classmethod
    def for_checkpoint(cls, cfg: SegmentationConfig, checkpoint: Path) -> SegmentationTask:
        """Scoring ``checkpoint`` (an exported ``segmenter.pt``, whose spec names the encoder,
        or any file whose state dict has this config's segmenter keys)."""
        return cls(config_for_checkpoint(cfg, checkpoint))

    def load_checkpoint(self, checkpoint: Path) -> nn.Module:
        module = build_segmentation_module(self.cfg, self.spec, None)
        state = read_state_dict(checkpoint)
        if not any(k.startswith(MODEL_PREFIX) for k in state):
            state = {f"{MODEL_PREFIX}{k}": v for k, v in state.items()}
        load_task_weights(module, state, checkpoint, "segmenter", read_spec(checkpoint))
        return module
