"""The pretraining job's config: :class:`PretrainConfig`, the shared sections of
:mod:`pretrain.engine.config` plus the CLIP model, the shard mixture, the loss and the zero-shot
and retrieval evaluations."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from data_tools.remote import RemotePolicy
from pretrain.engine.config import EvalConfig, JobConfig, Section, StreamConfig


class ImageTower(Section):
    name: str = "davit_tiny"
    # Architecture overrides passed to the timm entrypoint (e.g. depths, embed_dims, num_heads),
    # which is how the demo scales DaViT down for a CPU.
    overrides: dict[str, Any] = Field(default_factory=dict)
    image_size: int = Field(224, ge=32)
    drop_path: float = Field(0.0, ge=0.0, lt=1.0)
    pool: Literal["avg", "abs_attn", "rot_attn"] = "avg"
    proj: Literal["linear", "mlp"] = "linear"
    grad_checkpointing: bool = False
    lr: float | None = Field(None, gt=0)  # this tower's lr (default: optimizer.lr)


class TextTower(Section):
    context_length: int = Field(77, ge=4)
    vocab_size: int = 49408
    width: int = Field(512, ge=8)
    heads: int = Field(8, ge=1)
    layers: int = Field(12, ge=1)
    grad_checkpointing: bool = False
    lr: float | None = Field(None, gt=0)  # this tower's lr (default: optimizer.lr)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TextTower:
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        return self


class WarmStart(Section):
    """Weights a new run starts from (a resumed run ignores them: its checkpoint wins).

    ``clip``: a whole CLIP model of the same architecture (an open_clip checkpoint or
    ``open_clip_model.safetensors``, or this project's ``clip.pt``); ``image``: the image tower
    only (an official DaViT / DAT++ / DWNet checkpoint, a timm one, or our ``encoder.pt``)."""

    clip: str | None = None
    image: str | None = None


class ModelConfig(Section):
    embed_dim: int = Field(512, ge=8)
    image: ImageTower = Field(default_factory=ImageTower)
    text: TextTower = Field(default_factory=TextTower)
    init_from: WarmStart = Field(default_factory=WarmStart)


class ShardSetConfig(Section):
    shards: str
    weight: float = Field(1.0, gt=0)


class RemoteShardsConfig(Section):
    """Bounds on reading shards from object storage (``http(s)://``, ``s3://``, ``pipe:``;
    data_tools/remote.py). A shard that fails within them is skipped, counted and listed in
    RUN_DIR/skipped.jsonl; the most one shard can cost a data worker is
    (retries + 1) x (connect_timeout + read_timeout) + the backoff waits."""

    connect_timeout: float = Field(20.0, gt=0)
    read_timeout: float = Field(60.0, gt=0)  # seconds without a byte end the attempt
    retries: int = Field(3, ge=0, le=10)  # failures before the first byte retried this often
    backoff: float = Field(1.0, ge=0)  # seconds before the first retry, doubling ...
    max_backoff: float = Field(16.0, ge=0)  # ... up to this
    # --check (and every rank at start-up) opens this many shards of each remote set.
    probe_shards: int = Field(4, ge=0)

    def policy(self) -> RemotePolicy:
        return RemotePolicy(connect_timeout=self.connect_timeout,
                            read_timeout=self.read_timeout, retries=self.retries,
                            backoff=self.backoff, max_backoff=self.max_backoff)


class DataConfig(StreamConfig):
    # One brace pattern, a list of weighted shard sets, or a mixture YAML file (data_tools.mixture).
    train: str | list[ShardSetConfig]
    remote: RemoteShardsConfig = Field(default_factory=RemoteShardsConfig)
    scale: tuple[float, float] = (0.9, 1.0)  # RandomResizedCrop scale range, as open_clip
    # Decode large JPEGs at a reduced DCT scale that still covers the crop (pretrain.data.
    # jpeg_draft_size); images already near the training size decode exactly as without it.
    jpeg_draft: bool = True

    @property
    def mixture_spec(self) -> str | list[dict]:
        """``train`` in the form :func:`data_tools.mixture.load_mixture` reads."""
        return self.train if isinstance(self.train, str) else [s.model_dump() for s in self.train]


class LossConfig(Section):
    kind: Literal["clip", "siglip"] = "clip"
    local_loss: bool = True
    gather_with_grad: bool = True
    max_logit_scale: float = Field(100.0, gt=1)


class ZeroShotEval(Section):
    """Zero-shot classification of a labelled image set through text prompts."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")  # metrics: eval/<name>/top1, top5
    # An ImageFolder root (one folder per class, e.g. ImageNet val in wnid folders) or a
    # brace pattern of labelled shards.
    images: str
    label_key: str | None = None  # shards: the .json field holding the class (name or index)
    # "imagenet": open_clip's ImageNet names (for wnid folders, or indices 0..999); "folders":
    # the folder names themselves; a text file with one name per line; or the names.
    classes: str | list[str] = "imagenet"
    # "openai": OpenAI's 80 ImageNet templates (open_clip's); a text file with one template per
    # line ("{}" marks the class); or the templates.
    templates: str | list[str] = "openai"
    limit: int | None = Field(None, ge=1)  # at most this many images (the first in order)


class RetrievalEval(Section):
    """Image-to-text and text-to-image recall on held-out image-caption shards (several
    captions per image when the sample's .json has a ``captions`` list)."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")  # metrics: eval/<name>/i2t_r1, ...
    shards: str
    limit: int | None = Field(None, ge=1)


class PretrainEvalConfig(EvalConfig):
    zero_shot: list[ZeroShotEval] = Field(default_factory=list)
    retrieval: list[RetrievalEval] = Field(default_factory=list)

    @model_validator(mode="after")
    def _names_unique(self) -> PretrainEvalConfig:
        names = [e.name for e in [*self.zero_shot, *self.retrieval]]
        if len(names) != len(set(names)):
            raise ValueError(f"evaluation names must be unique, got {names}")
        return self


class PretrainConfig(JobConfig):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    loss: LossConfig = Field(default_factory=LossConfig)
    eval: PretrainEvalConfig = Field(default_factory=PretrainEvalConfig)
