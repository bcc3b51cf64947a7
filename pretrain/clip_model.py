"""The contrastive model: an open_clip ``CLIP`` whose image tower is any timm encoder.

open_clip's timm tower builds its trunk by name only. Architecture overrides from the config
(how the demo shrinks DaViT for a CPU) are therefore registered as a named timm variant, so
open_clip, fine-tuning and export all build the encoder the same way: by name.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import open_clip
import timm
import torch
from open_clip.tokenizer import SimpleTokenizer
from timm.models import register_model

import pretrain.encoders  # noqa: F401  (registers this project's encoders with timm)
from pretrain.config import ModelConfig


def register_variant(name: str, overrides: dict[str, Any]) -> str:
    """Register ``name`` with ``overrides`` as a timm model and return the variant's name."""
    if not timm.is_model(name):
        raise ValueError(f"unknown encoder {name!r}: not a registered timm model")
    if not overrides:
        return name
    digest = hashlib.sha1(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]
    variant = f"{name}_v{digest}"
    if timm.is_model(variant):
        return variant

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
        return timm.create_model(name, pretrained=pretrained, **{**overrides, **kwargs})

    entrypoint.__name__ = variant
    entrypoint.__module__ = __name__
    register_model(entrypoint)
    return variant


def build_clip(cfg: ModelConfig, init_logit_bias: float | None = None) -> open_clip.CLIP:
    """Build the CLIP model of a config (random init; weights come from training or export)."""
    vision = open_clip.CLIPVisionCfg(
        timm_model_name=register_variant(cfg.image.name, cfg.image.overrides),
        timm_model_pretrained=False,
        timm_pool=cfg.image.pool,
        timm_proj=cfg.image.proj,
        timm_drop_path=cfg.image.drop_path,
        image_size=cfg.image.image_size,
    )
    text = open_clip.CLIPTextCfg(
        context_length=cfg.text.context_length,
        vocab_size=cfg.text.vocab_size,
        width=cfg.text.width,
        heads=cfg.text.heads,
        layers=cfg.text.layers,
    )
    init_logit_scale = math.log(10.0) if init_logit_bias is not None else math.log(1 / 0.07)
    model = open_clip.CLIP(
        embed_dim=cfg.embed_dim,
        vision_cfg=vision,
        text_cfg=text,
        init_logit_scale=init_logit_scale,
        init_logit_bias=init_logit_bias,
        # A 1-element (not 0-dim) temperature: DeepSpeed's initial broadcast views every
        # parameter as bytes, which fails on 0-dim tensors.
        nonscalar_logit_scale=True,
    )
    if cfg.image.grad_checkpointing:
        model.visual.set_grad_checkpointing(True)
    if cfg.text.grad_checkpointing:
        model.transformer.grad_checkpointing = True
    return model


def image_encoder(clip: open_clip.CLIP) -> torch.nn.Module:
    """The timm trunk of the image tower (what fine-tuning transfers)."""
    return clip.visual.trunk


def build_tokenizer(context_length: int) -> SimpleTokenizer:
    """open_clip's BPE tokenizer; its vocabulary ships inside the wheel (no download)."""
    return SimpleTokenizer(context_length=context_length)


__all__ = ["build_clip", "build_tokenizer", "image_encoder", "register_variant"]
