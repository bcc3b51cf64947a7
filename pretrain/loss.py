"""Contrastive objectives, from open_clip, wrapped with the CLIP model into one module.

DeepSpeed wants a single module whose forward returns the loss; :class:`ContrastiveTask` is it.
The CLIP loss gathers features from every rank with gradients (``gather_with_grad``) and each
rank scores only its own rows against all columns (``local_loss``): every rank sees every
negative while the logit memory per rank grows linearly, not quadratically, with world size.
"""

from __future__ import annotations

import math

import open_clip
import torch
from open_clip.loss import ClipLoss, SigLipLoss
from torch import nn

from pretrain.config import LossConfig


def build_loss(cfg: LossConfig, rank: int, world_size: int) -> nn.Module:
    if cfg.kind == "siglip":
        return SigLipLoss(rank=rank, world_size=world_size)
    return ClipLoss(
        local_loss=cfg.local_loss,
        gather_with_grad=cfg.gather_with_grad,
        cache_labels=True,
        rank=rank,
        world_size=world_size,
    )


class ContrastiveTask(nn.Module):
    """CLIP model + loss: ``forward({"image", "text"}) -> {"loss"}``.

    The towers compute in the engine's dtype (bf16 parameters on GPUs); the normalised features
    are promoted to fp32 before the logits, so the softmax over the global batch (tens of
    thousands of columns for a large run) is not taken in bf16.
    """

    def __init__(self, clip: open_clip.CLIP, loss: nn.Module, max_logit_scale: float) -> None:
        super().__init__()
        self.clip = clip
        self.loss = loss
        # The learned temperature is clamped in the forward (open_clip clamps the parameter after
        # each step); clamping here works unchanged when ZeRO-3 partitions the parameter.
        self.max_log_scale = math.log(max_logit_scale)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image_features = self.clip.encode_image(batch["image"], normalize=True).float()
        text_features = self.clip.encode_text(batch["text"], normalize=True).float()
        logit_scale = self.clip.logit_scale.float().clamp(max=self.max_log_scale).exp()
        if isinstance(self.loss, SigLipLoss):
            loss = self.loss(image_features, text_features, logit_scale,
                             self.clip.logit_bias.float())
        else:
            loss = self.loss(image_features, text_features, logit_scale)
        return {"loss": loss}
