"""Bring a pretrained encoder into a fine-tuning model.

The encoder comes from this project's pretraining export (``encoder.pt``, which records how to
rebuild it: timm name + overrides) or from any checkpoint :mod:`pretrain.models.weights`
understands, with the architecture named in the config.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

import pretrain.models  # noqa: F401  (registers this project's encoders with timm)
from finetune.config import EncoderConfig
from pretrain.models.weights import load_encoder_weights


def encoder_spec(cfg: EncoderConfig) -> tuple[str, dict[str, Any]]:
    """(timm name, overrides) of the encoder: from the export when it says, else the config."""
    if cfg.weights is not None:
        # mmap: read only the small spec now; the tensors are loaded once, by the weight loader.
        payload = torch.load(cfg.weights, map_location="cpu", weights_only=True, mmap=True)
        spec = payload.get("encoder") if isinstance(payload, dict) else None
        if spec is not None:
            if cfg.name is not None and cfg.name != spec["timm_name"]:
                raise ValueError(f"encoder.name {cfg.name!r} contradicts {cfg.weights}, which "
                                 f"holds a {spec['timm_name']!r}")
            return spec["timm_name"], dict(spec["overrides"])
    if cfg.name is None:
        raise ValueError(f"{cfg.weights} does not say which encoder it holds: set encoder.name")
    return cfg.name, dict(cfg.overrides)


def build_encoder(cfg: EncoderConfig, **timm_kwargs: Any) -> nn.Module:
    """Create the timm encoder (with ``timm_kwargs`` such as ``num_classes``) and load weights;
    a classifier head the checkpoint lacks or sizes differently stays freshly initialised."""
    name, overrides = encoder_spec(cfg)
    model = timm.create_model(name, drop_path_rate=cfg.drop_path, **{**overrides, **timm_kwargs})
    if cfg.weights is not None:
        load_encoder_weights(model, cfg.weights, skip_classifier=True)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model
