"""Test-time inference as mmseg's ADE20K recipes run it, for any ``model.logits(image)`` that
maps an NCHW batch to per-pixel logits of the same size.

- ``whole``: the image rescaled to fit ``scale`` (2048 x 512: short side 512 unless the long
  side would pass 2048), one forward, the logits resized back to the original size;
- ``slide``: the same rescaled image in ``crop`` windows every ``stride`` pixels (512 / 341),
  the windows' logits averaged where they overlap;
- multi-scale + flip: the image rescaled by each of ``ratios`` (x ``scale``) and, with ``flip``,
  also mirrored; each view runs ``whole`` or ``slide``; the softmax probabilities, resized to the
  original size (and mirrored back), are averaged.

Every function returns class probabilities or logits at the original size, ``(N, K, H, W)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def rescaled_size(height: int, width: int, scale: Sequence[int]) -> tuple[int, int]:
    """mmseg's keep-ratio rescale: the largest size that fits ``scale`` (long, short)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False)


def slide_logits(model: nn.Module, image: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """Logits of ``image`` from ``crop`` x ``crop`` windows every ``stride`` pixels (windows
    shifted inside the image at its edges; a side shorter than ``crop`` is one window)."""
    height, width = image.shape[-2:]
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    total: torch.Tensor | None = None
    count = torch.zeros(1, 1, height, width, device=image.device)
    for row in range(rows):
        for col in range(cols):
            top = max(min(row * stride, height - crop), 0)
            left = max(min(col * stride, width - crop), 0)
            window = image[..., top:top + crop, left:left + crop]
            logits = model.logits(window).float()
            if total is None:
                total = torch.zeros(image.shape[0], logits.shape[1], height, width,
                                    device=image.device)
            total[..., top:top + crop, left:left + crop] += logits
            count[..., top:top + crop, left:left + crop] += 1
    return total / count


def view_logits(model: nn.Module, image: torch.Tensor, mode: str, crop: int,
                stride: int) -> torch.Tensor:
    if mode == "slide":
        return slide_logits(model, image, crop, stride)
    if mode == "whole":
        return model.logits(image).float()
    raise ValueError(f"eval.mode: unknown inference mode {mode!r} (whole, slide)")


def predict_logits(model: nn.Module, image: torch.Tensor, mode: str = "whole",
                   scale: Sequence[int] = (2048, 512), crop: int = 512,
                   stride: int = 341) -> torch.Tensor:
    """Single-scale logits at the original size (``mode``: whole or slide)."""
    size = tuple(image.shape[-2:])
    view = resize(image, rescaled_size(*size, scale))
    return resize(view_logits(model, view, mode, crop, stride), size)


def predict_multiscale(model: nn.Module, image: torch.Tensor, ratios: Sequence[float],
                       flip: bool, mode: str = "whole", scale: Sequence[int] = (2048, 512),
                       crop: int = 512, stride: int = 341) -> torch.Tensor:
    """Class probabilities averaged over ``ratios`` x (plain, mirrored if ``flip``)."""
    size = tuple(image.shape[-2:])
    total: torch.Tensor | None = None
    views = 0
    for ratio in ratios:
        scaled = tuple(int(side * ratio) for side in scale)
        view = resize(image, rescaled_size(*size, scaled))
        for mirrored in (False, True) if flip else (False,):
            source = view.flip(-1) if mirrored else view
            probs = view_logits(model, source, mode, crop, stride).softmax(dim=1)
            if mirrored:
                probs = probs.flip(-1)
            probs = resize(probs, size)
            total = probs if total is None else total + probs
            views += 1
    return total / views
