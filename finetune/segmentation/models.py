"""Segmenters on a :class:`~finetune.backbone.Backbone`: UPerNet (smp's decoder) with the
auxiliary FCN head, and Semantic FPN (torchvision's FPN neck + the mmseg-style FPN head), as the
DaViT, DAT++ and DWNet papers evaluated their backbones.

Every segmenter maps an image of any size to per-pixel logits of the same size
(:meth:`Segmenter.logits`): the image is padded at the bottom and right to a multiple of 32 (the
backbone's largest stride), the decoder's stride-4 logits are resized to the padded size and
cropped back, as mmseg does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base import initialization as smp_init
from segmentation_models_pytorch.base.modules import Conv2dReLU
from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

from finetune.backbone import Backbone
from pretrain.engine import distributed

PAD_MULTIPLE = 32


def pad_to_multiple(image: torch.Tensor, multiple: int = PAD_MULTIPLE) -> torch.Tensor:
    """Zero-pad an NCHW batch at the bottom / right to a multiple of ``multiple``."""
    height, width = image.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    return F.pad(image, (0, pad_w, 0, pad_h)) if pad_h or pad_w else image


def classifier(channels: int, num_classes: int, dropout: float) -> nn.Sequential:
    """Dropout (of whole channels, as mmseg's ``Dropout2d``) and the 1x1 classifier."""
    return nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))


class FCNHead(nn.Module):
    """mmseg's auxiliary FCNHead (one conv): 3x3 conv-BN-ReLU, dropout, 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.conv = Conv2dReLU(in_channels, channels, kernel_size=3, padding=1)
        self.cls = classifier(channels, num_classes, dropout)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.cls(self.conv(feature))


class UPerNetHead(nn.Module):
    """smp's UPerNet decoder (PSP on the stride-32 map, FPN, fusion; mmseg's UPerHead) and the
    classifier. smp's decoder normalises each input level with its own LayerNorm; the backbone
    already has the per-level norms the official checkpoints carry, so those are identities."""

    def __init__(self, channels: list[int], num_classes: int, decoder_channels: int = 512,
                 dropout: float = 0.1) -> None:
        super().__init__()
        # smp counts levels from stride 1; the two placeholders stand for strides 1 and 2.
        self.decoder = UPerNetDecoder([3, 0, *channels], encoder_depth=len(channels) + 1,
                                      decoder_channels=decoder_channels)
        self.decoder.feature_norms = nn.ModuleList(nn.Identity() for _ in channels)
        smp_init.initialize_decoder(self.decoder)  # what smp's own UPerNet does
        self.cls = classifier(decoder_channels, num_classes, dropout)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.cls(self.decoder([None, None, *features]))


class SemanticFPNHead(nn.Module):
    """torchvision's FPN neck, then mmseg's FPNHead: per level, 3x3 conv-BN-ReLU followed by x2
    upsampling until stride 4 (one conv for stride 4), summed, dropout, 1x1 classifier."""

    def __init__(self, channels: list[int], strides: list[int], num_classes: int,
                 fpn_channels: int = 256, head_channels: int = 128,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.neck = FeaturePyramidNetwork(channels, fpn_channels)
        base = min(strides)
        self.scale_heads = nn.ModuleList()
        for stride in strides:
            steps = max(1, int(math.log2(stride // base)))
            layers: list[nn.Module] = []
            for step in range(steps):
                layers.append(Conv2dReLU(fpn_channels if step == 0 else head_channels,
                                         head_channels, kernel_size=3, padding=1))
                if stride > base:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear",
                                              align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.cls = classifier(head_channels, num_classes, dropout)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        levels = self.neck({str(i): f for i, f in enumerate(features)})
        out = None
        for head, feature in zip(self.scale_heads, levels.values(), strict=True):
            level = head(feature)
            if out is None:
                out = level
            else:
                # a padded map's odd sizes may round differently per level
                out = out + F.interpolate(level, size=out.shape[-2:], mode="bilinear",
                                          align_corners=False)
        return self.cls(out)


class Segmenter(nn.Module):
    """Backbone + decode head (+ auxiliary head): per-pixel logits at the input's size."""

    def __init__(self, backbone: Backbone, head: nn.Module,
                 aux_head: nn.Module | None = None, aux_index: int = 2) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = head
        self.aux_head = aux_head
        self.aux_index = aux_index

    def forward_train(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Main and auxiliary logits at the input's size (in fp32, for the loss)."""
        height, width = image.shape[-2:]
        padded = pad_to_multiple(image)
        features = self.backbone(padded)
        main = self._resize(self.decode_head(features), padded, height, width)
        aux = None
        if self.aux_head is not None and self.training:
            aux = self._resize(self.aux_head(features[self.aux_index]), padded, height, width)
        return main, aux

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        return self.forward_train(image)[0]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.logits(image)

    @staticmethod
    def _resize(logits: torch.Tensor, padded: torch.Tensor, height: int,
                width: int) -> torch.Tensor:
        logits = F.interpolate(logits.float(), size=padded.shape[-2:], mode="bilinear",
                               align_corners=False)
        return logits[..., :height, :width]


def build_segmenter(kind: str, backbone: Backbone, num_classes: int, decoder_channels: int,
                    dropout: float, aux_weight: float, aux_channels: int,
                    head_channels: int) -> Segmenter:
    """``kind``: ``upernet`` (decoder of ``decoder_channels``, auxiliary FCN head on the
    stride-16 level when ``aux_weight`` > 0) or ``semantic_fpn`` (neck of
    ``decoder_channels``, head of ``head_channels``)."""
    channels, strides = backbone.channels, backbone.strides
    if kind == "upernet":
        aux_index = strides.index(16) if 16 in strides else len(channels) - 2
        aux = (FCNHead(channels[aux_index], num_classes, aux_channels, dropout)
               if aux_weight > 0 else None)
        head = UPerNetHead(channels, num_classes, decoder_channels, dropout)
        return Segmenter(backbone, head, aux, aux_index)
    if kind == "semantic_fpn":
        head = SemanticFPNHead(channels, strides, num_classes, decoder_channels, head_channels,
                               dropout)
        return Segmenter(backbone, head)
    raise ValueError(f"model.kind: unknown segmenter {kind!r} (upernet, semantic_fpn)")


def average_batchnorm_statistics(module: nn.Module) -> None:
    """Collective: every per-rank BatchNorm's running mean and variance averaged over the ranks
    (SyncBatchNorm's already agree).

    DeepSpeed, unlike DDP, never synchronises buffers, so per-rank BatchNorm statistics drift
    apart: each rank would evaluate a different model, and checkpoints keep only rank 0's (a
    resumed rank 1 would lose its own). Averaging them after every optimizer step (timm's
    ``distribute_bn`` does it per epoch) keeps one model on every rank, in every checkpoint
    and in the export, for one small all-reduce per step."""
    norms = [m for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and not isinstance(m, nn.SyncBatchNorm) and m.track_running_stats]
    buffers = [b for m in norms for b in (m.running_mean, m.running_var)]
    if not buffers or distributed.world_size() == 1:
        return
    flat = torch.cat([b.detach().double().flatten().cpu() for b in buffers])
    mean = distributed.all_reduce(flat) / distributed.world_size()
    offset = 0
    with torch.no_grad():
        for buffer in buffers:
            count = buffer.numel()
            buffer.copy_(mean[offset:offset + count].view_as(buffer).to(buffer.dtype))
            offset += count
