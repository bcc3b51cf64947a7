"""Fine-tuning job schemas: one per task, discriminated by ``task:``, built from the sections
every job shares (:class:`pretrain.config.JobConfig`: train, optimizer, schedule, eval,
deepspeed, log, checkpoint) plus the task's own ``encoder``, ``data`` and ``loss``.

``load_config(FinetuneConfig, path)`` reads any of them: :class:`FinetuneConfig` picks the schema
the file's ``task:`` names.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pretrain.config import EvalConfig, JobConfig, Section, StreamConfig


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
    train: str  # shard pattern or mixture, as in pretraining
    val: str
    label_key: str = "cls"  # field of the sample's .json holding the label (name or index)
    classes: list[str] | None = None  # names, when labels are names; index order = class index
    num_classes: int = Field(..., ge=2)
    image_size: int = Field(224, ge=32)
    randaugment: str | None = "rand-m9-mstd0.5-inc1"
    random_erasing: float = Field(0.25, ge=0, le=1)
    scale: tuple[float, float] = (0.08, 1.0)
    crop_pct: float = Field(0.875, gt=0, le=1)  # evaluation: resize to size/crop_pct, centre crop
    mixup: float = Field(0.0, ge=0)  # alpha; 0 disables
    cutmix: float = Field(0.0, ge=0)  # alpha; 0 disables

    @model_validator(mode="after")
    def _classes_match(self) -> ClassificationData:
        if self.classes is not None and len(self.classes) != self.num_classes:
            raise ValueError("data.classes must list data.num_classes names")
        return self


class ClassificationLoss(Section):
    label_smoothing: float = Field(0.1, ge=0, lt=1)


class ClassificationConfig(JobConfig):
    task: Literal["classification"]
    encoder: EncoderConfig
    data: ClassificationData
    loss: ClassificationLoss = Field(default_factory=ClassificationLoss)
    eval: EvalConfig = Field(default_factory=lambda: EvalConfig(best_metric="top1"))


TASK_CONFIGS: dict[str, type[JobConfig]] = {"classification": ClassificationConfig}


class FinetuneConfig:
    """Not a schema itself: validates a config tree with the schema its ``task:`` names."""

    @staticmethod
    def model_validate(tree: dict[str, Any]) -> JobConfig:
        task = tree.get("task")
        if task not in TASK_CONFIGS:
            known = ", ".join(sorted(TASK_CONFIGS))
            raise ValueError(f"task: {'missing' if task is None else repr(task)} "
                             f"(expected one of: {known})")
        return TASK_CONFIGS[task].model_validate(tree)
