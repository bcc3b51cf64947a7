"""Image classification fine-tuning under DeepSpeed, with timm's recipe components.

Layer-wise lr decay: timm's ``param_groups_layer_decay`` gives each group an ``lr_scale``;
timm's schedulers honour it, DeepSpeed's do not, so it is folded into each group's ``lr``
here. DeepSpeed's ``WarmupCosineLR`` then scales every group's own lr, which keeps the decay.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

from data_tools.mixture import load_mixture
from finetune.classification.data import (
    LabelledImageDecoder,
    classification_transform,
    collate_labelled,
)
from finetune.classification.evaluate import evaluate_top1
from finetune.config import ClassificationConfig
from finetune.transfer import build_encoder, encoder_spec
from pretrain.data import ResumableStream, StreamState, TrainLoader
from pretrain.engine import Trainer

MODEL_PREFIX = "model."


class ClassifierTask(nn.Module):
    """Encoder with classifier head + criterion: ``forward(image, target) -> loss``."""

    def __init__(self, model: nn.Module, criterion: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.criterion = criterion

    def forward(self, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.criterion(self.model(image).float(), target)


class ClassificationTrainer(Trainer):
    progress_label = "finetune"

    def __init__(self, cfg: ClassificationConfig, run_dir: Path) -> None:
        self.mixup = _build_mixup(cfg)
        super().__init__(cfg, run_dir, micro_batch=cfg.data.batch_size,
                         num_workers=cfg.data.workers)

    def build_task(self) -> nn.Module:
        cfg = self.cfg
        model = build_encoder(cfg.encoder, num_classes=cfg.data.num_classes)
        if self.mixup is not None:
            criterion: nn.Module = SoftTargetCrossEntropy()
        elif cfg.train.label_smoothing > 0:
            criterion = LabelSmoothingCrossEntropy(cfg.train.label_smoothing)
        else:
            criterion = nn.CrossEntropyLoss()
        return ClassifierTask(model, criterion)

    def param_groups(self, task: nn.Module) -> list[dict[str, Any]]:
        train, model = self.cfg.train, task.model
        no_decay = getattr(model, "no_weight_decay", lambda: set())()
        if train.layer_decay is not None:
            groups = param_groups_layer_decay(model, train.weight_decay, no_decay,
                                              layer_decay=train.layer_decay)
        else:
            groups = param_groups_weight_decay(model, train.weight_decay, no_decay)
        for group in groups:
            group["lr"] = train.lr * group.pop("lr_scale", 1.0)
        return groups

    def build_loader(self, state: StreamState) -> TrainLoader:
        data = self.cfg.data
        stream = ResumableStream(
            shard_sets=load_mixture(data.train),
            decode=LabelledImageDecoder(data, classification_transform(data, training=True)),
            collate=collate_labelled,
            batch_size=data.batch_size,
            seed=self.cfg.train.seed,
            rank=self.rank,
            num_workers=data.workers,
            shuffle_buffer=data.shuffle_buffer,
            shuffle_initial=data.shuffle_initial,
            state=state,
        )
        return TrainLoader(stream, data.workers)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        image, label = batch["image"], batch["label"]
        if self.mixup is not None:
            image, label = self.mixup(image, label)
        return self.engine(self.to_device(image, floating=True), self.to_device(label))

    def export(self) -> None:
        """Consolidate fp32 weights, write ``export/classifier.pt`` and evaluate them."""
        state = get_fp32_state_dict_from_zero_checkpoint(str(self.run_dir / "checkpoints"))
        weights = {k[len(MODEL_PREFIX):]: v for k, v in state.items()
                   if k.startswith(MODEL_PREFIX)}
        name, overrides = encoder_spec(self.cfg.encoder)
        spec = {"timm_name": name, "overrides": overrides,
                "num_classes": self.cfg.data.num_classes}
        out = self.run_dir / "export"
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "classifier.pt.tmp"
        torch.save({"state_dict": weights, "encoder": spec}, tmp)
        tmp.replace(out / "classifier.pt")
        # Evaluate the exported fp32 weights, not the engine's (possibly bf16, sharded) copy.
        classifier = timm.create_model(name, num_classes=self.cfg.data.num_classes, **overrides)
        classifier.load_state_dict(weights, strict=True)
        result = evaluate_top1(classifier, self.cfg.data)
        (out / "eval.json").write_text(json.dumps(result, indent=2))
        print(f"validation top-1 {result['top1']:.4f} on {result['samples']} images")


def _build_mixup(cfg: ClassificationConfig) -> Mixup | None:
    train = cfg.train
    if train.mixup <= 0 and train.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=train.mixup, cutmix_alpha=train.cutmix,
                 label_smoothing=train.label_smoothing, num_classes=cfg.data.num_classes)
