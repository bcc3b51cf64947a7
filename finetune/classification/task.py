"""Image classification as a task of the shared trainer, with timm's recipe components.

Layer-wise lr decay: timm's ``param_groups_layer_decay`` gives each group an ``lr_scale``; it is
folded into the group's own ``lr`` here, which the trainer's schedule then scales, so the decay
survives the schedule.

Data: labelled shards (``data.layout: shards``) or ImageFolder trees read directly
(``imagefolder``), both resumable exactly. With ``ema.enabled`` an EMA of the weights is kept
(:mod:`finetune.classification.ema`) and scored beside the model at every evaluation
(``ema_top1``, ``ema_top5``). ``linear_probe`` freezes the encoder and trains only its linear
classifier. The export is ``classifier.pt`` and a timm folder (``timm/``: safetensors and
config.json, see :mod:`pretrain.encoders.timm_export`), and the same for the EMA when kept.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

from data_tools.files import atomic_torch_save
from data_tools.imagefolder import ImageFolderIndex
from data_tools.mixture import ShardSet, load_mixture, shard_set
from finetune.checks import check_encoder
from finetune.classification.classifier_checkpoints import load_classifier, validation_split
from finetune.classification.data import (
    LabelledImageDecoder,
    classification_transform,
    collate_labelled,
    imagefolder_index,
)
from finetune.classification.ema import WeightsEma
from finetune.classification.imagefolder import ImageFolderSplit, ImageFolderStream
from finetune.classification.metrics import AccuracyEvaluator
from finetune.config import ClassificationConfig
from finetune.transfer import build_encoder, resolve_spec
from pretrain.encoders.spec import SPEC_KEY, ModelSpec
from pretrain.encoders.timm_export import write_timm_export
from pretrain.encoders.weights import (
    WeightsMismatchError,
    check_encoder_weights,
    load_encoder_weights,
)
from pretrain.engine.eval_slices import SlicedSplit, sliced_loader
from pretrain.engine.flops import image_model_train_flops
from pretrain.engine.shard_stream import ShardStream
from pretrain.engine.stream import StreamState, TrainLoader
from pretrain.engine.task import Batch, Evaluator, LossOutput, Task, stream_epoch_samples

MODEL_PREFIX = "model."


class ClassifierModule(nn.Module):
    """Classifier + criterion: ``forward({"image", "label"}) -> {"loss"}``."""

    def __init__(self, model: nn.Module, criterion: nn.Module | None = None,
                 frozen_encoder: bool = False) -> None:
        super().__init__()
        self.model = model
        self.criterion = criterion
        self.frozen_encoder = frozen_encoder
        if frozen_encoder:
            model.requires_grad_(False)
            model.get_classifier().requires_grad_(True)

    def train(self, mode: bool = True) -> ClassifierModule:
        super().train(mode)
        if self.frozen_encoder:  # a probed encoder keeps its eval behaviour (BatchNorm stats)
            self.model.eval()
        return self

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


def _classifier_fits(model: nn.Module, weights: str) -> bool:
    """Whether ``weights`` hold a classifier for exactly this model's classes (an ImageNet
    checkpoint continued at 384 px keeps its head; an encoder export or another class count
    gets a fresh one)."""
    try:
        check_encoder_weights(model, weights)
    except WeightsMismatchError:
        return False
    return True


class ClassificationTask(Task):
    label = "finetune"
    eval_only_export = "classifier.pt"
    cfg: ClassificationConfig

    def __init__(self, cfg: ClassificationConfig) -> None:
        super().__init__(cfg)
        data = cfg.data
        self.ema = WeightsEma(cfg.ema) if cfg.ema.enabled else None
        self._module: ClassifierModule | None = None
        self.mixup = None
        if data.mixup > 0 or data.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=data.mixup, cutmix_alpha=data.cutmix,
                               label_smoothing=cfg.loss.label_smoothing,
                               num_classes=data.num_classes)

    # The encoder and the training data are resolved when first needed: --eval-only needs
    # neither (the checkpoint says what it holds, and the training split may be absent).
    @functools.cached_property
    def spec(self) -> ModelSpec:
        encoder = self.cfg.encoder
        return resolve_spec(encoder.weights, encoder.name, encoder.overrides)

    @functools.cached_property
    def train_index(self) -> ImageFolderIndex:
        return imagefolder_index(self.cfg.data, "train")

    @functools.cached_property
    def shard_sets(self) -> list[ShardSet]:
        return load_mixture(self.cfg.data.train)

    def build_module(self) -> nn.Module:
        encoder = self.cfg.encoder
        probe = self.cfg.linear_probe
        model = build_encoder(self.spec, None, drop_path=0.0 if probe else encoder.drop_path,
                              grad_checkpointing=encoder.grad_checkpointing,
                              num_classes=self.cfg.data.num_classes)
        if encoder.weights is not None:
            load_encoder_weights(model, encoder.weights,
                                 skip_classifier=not _classifier_fits(model, encoder.weights))
        # ZeRO 1/2 train this very object, so the EMA can follow it (ZeRO-3 has no EMA)
        self._module = ClassifierModule(model, _criterion(self.cfg, self.mixup is not None),
                                        frozen_encoder=probe)
        return self._module

    def param_groups(self, module: nn.Module) -> list[dict[str, Any]]:
        optimizer, model = self.cfg.optimizer, module.model
        if self.cfg.linear_probe:  # the usual probe: only the classifier, no weight decay
            head = [p for p in model.get_classifier().parameters()]
            return [{"params": head, "weight_decay": 0.0, "lr": optimizer.lr}]
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
        if self.cfg.data.layout == "imagefolder":
            return self.cfg.data.epoch_samples or len(self.train_index)
        return stream_epoch_samples(self.shard_sets, self.cfg.data.epoch_samples)

    def _train_transform(self) -> Any:
        return classification_transform(self.cfg.data, training=True,
                                        linear_probe=self.cfg.linear_probe)

    def build_loader(self, rank: int, state: StreamState) -> TrainLoader:
        data = self.cfg.data
        if data.layout == "imagefolder":
            from pretrain.engine import distributed

            folder = ImageFolderStream(
                self.train_index, self._train_transform(), collate_labelled, data.batch_size,
                self.cfg.train.seed, rank, distributed.world_size(), data.workers, state,
                source=f"data.train {data.train}", skips=self.skip_log(rank))
            return TrainLoader(folder, data.workers)
        stream = ShardStream(
            shard_sets=self.shard_sets,
            decode=LabelledImageDecoder(data, self._train_transform()),
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
        transform = classification_transform(data, training=False)
        if data.layout == "imagefolder":
            split = ImageFolderSplit(imagefolder_index(data, "val"), transform,
                                     collate_labelled, self.cfg.eval.batch_size, rank, world_size,
                                     self.skip_log(rank))
        else:
            split = SlicedSplit(data.val, LabelledImageDecoder(data, transform),
                                collate_labelled, self.cfg.eval.batch_size, rank, world_size)
        extra = {"ema_": lambda: self.ema.module} if self.ema is not None else None
        return AccuracyEvaluator(sliced_loader(split, data.workers), data.num_classes, extra)

    def after_optimizer_step(self, module: nn.Module, step: int) -> None:
        if self.ema is not None:
            self.ema.update(module.model, step)

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict()} if self.ema is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.ema is not None:
            self.ema.load_state_dict(state.get("ema", {}), self._module.model)

    @classmethod
    def check_inputs(cls, cfg: ClassificationConfig) -> None:
        check_encoder(cfg.encoder, num_classes=cfg.data.num_classes)
        if cfg.data.layout == "shards":
            load_mixture(cfg.data.train)
            shard_set(cfg.data.val)
            return
        for split in ("train", "val"):
            try:
                imagefolder_index(cfg.data, split)
            except (FileNotFoundError, ValueError) as error:
                raise type(error)(f"data.{split}: {error}") from None

    def checkpoint_evaluation(self, checkpoint: Path, rank: int, world_size: int
                              ) -> tuple[nn.Module, Evaluator]:
        """Any classifier checkpoint (see :mod:`.classifier_checkpoints`), scored with the
        transform and class order it comes with."""
        model, transform, classes = load_classifier(checkpoint, self.cfg)
        split = validation_split(self.cfg, transform, classes, model.num_classes, rank,
                                 world_size, self.skip_log(rank))
        evaluator = AccuracyEvaluator(sliced_loader(split, self.cfg.data.workers),
                                      model.num_classes)
        return ClassifierModule(model), evaluator

    def flops_per_sample(self) -> float:
        num_classes = self.cfg.data.num_classes
        return image_model_train_flops(lambda: self.spec.build_timm(num_classes=num_classes),
                                       self.cfg.data.image_size)

    def export(self, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        """``classifier.pt`` (the fp32 timm classifier and the spec that rebuilds it) and
        ``timm/`` (the same for timm users); with an EMA, ``classifier_ema.pt`` and
        ``timm_ema/`` too."""
        weights = {k[len(MODEL_PREFIX):]: v for k, v in state_dict.items()
                   if k.startswith(MODEL_PREFIX)}
        self._export_classifier(weights, out_dir, "")
        if self.ema is not None and self.ema.module is not None:
            self._export_classifier(self.ema.state_dict()["weights"], out_dir, "_ema")

    def _export_classifier(self, weights: dict[str, torch.Tensor], out_dir: Path,
                           suffix: str) -> None:
        data = self.cfg.data
        spec = ModelSpec(self.spec.timm_name, self.spec.overrides,
                         num_classes=data.num_classes, task="classification")
        atomic_torch_save({"state_dict": weights, SPEC_KEY: spec.to_dict()},
                          out_dir / f"classifier{suffix}.pt")
        # the evaluation transform of this recipe, so timm's create_transform reproduces it
        recipe = {"input_size": [3, data.image_size, data.image_size],
                  "crop_pct": data.crop_pct, "interpolation": "bicubic",
                  "mean": list(data.mean), "std": list(data.std)}
        if data.layout == "imagefolder":
            recipe["label_names"] = self.train_index.classes
        elif data.classes is not None:
            recipe["label_names"] = list(data.classes)
        write_timm_export(weights, spec, recipe, out_dir / f"timm{suffix}")
