"""Fine-tuning job schemas (validated like pretraining configs, see :mod:`pretrain.config`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pretrain.config import CheckpointConfig, DeepSpeedConfig, LogConfig, Section, check_warmup


class EncoderConfig(Section):
    # Where the weights come from: an export of our pretraining (encoder.pt), or any checkpoint
    # the weight loader understands; null trains from scratch.
    weights: str | None = None
    # timm name (+ overrides) when `weights` does not say how to build the encoder.
    name: str | None = None
    overrides: dict = Field(default_factory=dict)
    drop_path: float = Field(0.1, ge=0.0, lt=1.0)
    grad_checkpointing: bool = False


class ClassificationData(Section):
    train: str  # shard pattern or mixture, as in pretraining
    val: str
    label_key: str = "cls"  # field of the sample's .json holding the label (name or index)
    classes: list[str] | None = None  # names, when labels are names; index order = class index
    num_classes: int = Field(..., ge=2)
    image_size: int = Field(224, ge=32)
    batch_size: int = Field(..., ge=1)
    workers: int = Field(2, ge=0)
    shuffle_buffer: int = Field(2000, ge=1)
    shuffle_initial: int = Field(500, ge=1)
    randaugment: str | None = "rand-m9-mstd0.5-inc1"
    random_erasing: float = Field(0.25, ge=0, le=1)
    scale: tuple[float, float] = (0.08, 1.0)
    crop_pct: float = Field(0.875, gt=0, le=1)  # evaluation: resize to size/crop_pct, centre crop

    @model_validator(mode="after")
    def _classes_match(self) -> ClassificationData:
        if self.classes is not None and len(self.classes) != self.num_classes:
            raise ValueError("data.classes must list data.num_classes names")
        return self


class ClassificationTrain(Section):
    steps: int = Field(..., ge=1)
    seed: int = 0
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    layer_decay: float | None = Field(None, gt=0, le=1)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0)
    grad_accum: int = Field(1, ge=1)
    mixup: float = Field(0.0, ge=0)
    cutmix: float = Field(0.0, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    # Non-finite micro-batches are dropped and replaced; this many in a row abort the run.
    max_nonfinite_batches: int = Field(5, ge=1)

    @model_validator(mode="after")
    def _warmup_fits(self) -> ClassificationTrain:
        check_warmup(self.warmup_steps, self.steps)
        return self


class ClassificationConfig(Section):
    task: Literal["classification"] = "classification"
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    data: ClassificationData
    train: ClassificationTrain
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    @model_validator(mode="after")
    def _encoder_defined(self) -> ClassificationConfig:
        if self.encoder.weights is None and self.encoder.name is None:
            raise ValueError("encoder: set encoder.weights (an export) or encoder.name")
        return self
