"""Image classification as a task of the shared trainer, with timm's recipe components.

Layer-wise lr decay: timm's ``param_groups_layer_decay`` gives each group an ``lr_scale``; it is
folded into the group's own ``lr`` here, which the trainer's schedule then scales, so the decay
survives the schedule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

from data_tools.files import atomic_torch_save
from data_tools.mixture import load_mixture
from finetune.classification.data import (
    LabelledImageDecoder,
    classification_transform,
    collate_labelled,
)
from finetune.classification.metrics import AccuracyEvaluator
from finetune.config import ClassificationConfig
from finetune.transfer import build_encoder, resolve_spec
from pretrain.data import ResumableStream, StreamState, TrainLoader
from pretrain.eval_data import SlicedSplit, sliced_loader
from pretrain.flops import image_model_train_flops
from pretrain.models.spec import SPEC_KEY, ModelSpec
from pretrain.task import Batch, Evaluator, LossOutput, Task, stream_epoch_samples

MODEL_PREFIX = "model."


class ClassifierModule(nn.Module):
    """Classifier + criterion: ``forward({"image", "label"}) -> {"loss"}``."""

    def __init__(self, model: nn.Module, criterion: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.criterion = criterion

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image).float()  # the loss and top-k in fp32 whatever the compute dtype

    def forward(self, batch: Batch) -> LossOutput:
        return {"loss": self.criterion(self.logits(batch["image"]), batch["label"])}


def _criterion(cfg: ClassificationConfig, mixup: bool) -> nn.Module:
    if mixup:
        return SoftTargetCrossEntropy()  # mixup makes the (smoothed) soft targets itself
    if cfg.loss.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(cfg.loss.label_smoothing)
    return nn.CrossEntropyLoss()


class ClassificationTask(Task):
    label = "finetune"
    cfg: ClassificationConfig

    def __init__(self, cfg: ClassificationConfig) -> None:
        super().__init__(cfg)
        encoder = cfg.encoder
        self.spec = resolve_spec(encoder.weights, encoder.name, encoder.overrides)
        self.shard_sets = load_mixture(cfg.data.train)
        data = cfg.data
        self.mixup = None
        if data.mixup > 0 or data.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=data.mixup, cutmix_alpha=data.cutmix,
                               label_smoothing=cfg.loss.label_smoothing,
                               num_classes=data.num_classes)

    def build_module(self) -> nn.Module:
        encoder = self.cfg.encoder
        model = build_encoder(self.spec, encoder.weights, drop_path=encoder.drop_path,
                              grad_checkpointing=encoder.grad_checkpointing,
                              num_classes=self.cfg.data.num_classes)
        return ClassifierModule(model, _criterion(self.cfg, self.mixup is not None))

    def param_groups(self, module: nn.Module) -> list[dict[str, Any]]:
        optimizer, model = self.cfg.optimizer, module.model
        no_decay = getattr(model, "no_weight_decay", lambda: set())()
        layer_decay = self.cfg.encoder.layer_decay
        if layer_decay is not None:
            groups = param_groups_layer_decay(model, optimizer.weight_decay, no_decay,
                                              layer_decay=layer_decay)
        else:
            groups = param_groups_weight_decay(model, optimizer.weight_decay, no_decay)
        for group in groups:
            group["lr"] = optimizer.lr * group.pop("lr_scale", 1.0)
        return groups

    def epoch_samples(self) -> int | None:
        return stream_epoch_samples(self.shard_sets, self.cfg.data.epoch_samples)

    def build_loader(self, rank: int, state: StreamState) -> TrainLoader:
        data = self.cfg.data
        stream = ResumableStream(
            shard_sets=self.shard_sets,
            decode=LabelledImageDecoder(data, classification_transform(data, training=True)),
            collate=collate_labelled,
            batch_size=data.batch_size,
            seed=self.cfg.train.seed,
            rank=rank,
            num_workers=data.workers,
            shuffle_buffer=data.shuffle_buffer,
            shuffle_initial=data.shuffle_initial,
            state=state,
        )
        return TrainLoader(stream, data.workers)

    def prepare_batch(self, batch: Batch) -> Batch:
        if self.mixup is None:
            return batch
        image, label = self.mixup(batch["image"], batch["label"])
        return {**batch, "image": image, "label": label}

    def evaluator(self, rank: int, world_size: int) -> Evaluator:
        data = self.cfg.data
        split = SlicedSplit(data.val, LabelledImageDecoder(data, classification_transform(
            data, training=False)), collate_labelled, self.cfg.eval.batch_size, rank, world_size)
        return AccuracyEvaluator(sliced_loader(split, data.workers), data.num_classes)

    def flops_per_sample(self) -> float:
        num_classes = self.cfg.data.num_classes
        return image_model_train_flops(lambda: self.spec.build_timm(num_classes=num_classes),
                                       self.cfg.data.image_size)

    def export(self, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        """``classifier.pt``: the fp32 timm classifier and the spec that rebuilds it."""
        weights = {k[len(MODEL_PREFIX):]: v for k, v in state_dict.items()
                   if k.startswith(MODEL_PREFIX)}
        spec = ModelSpec(self.spec.timm_name, self.spec.overrides,
                         num_classes=self.cfg.data.num_classes, task="classification")
        atomic_torch_save({"state_dict": weights, SPEC_KEY: spec.to_dict()},
                          out_dir / "classifier.pt")
