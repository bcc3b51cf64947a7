"""Model FLOPs, counted on the meta device (no memory, no compute), for MFU and planning."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from pretrain.config import ModelConfig


def clip_forward_flops(cfg: ModelConfig) -> dict[str, float]:
    """Forward FLOPs (multiply and add counted separately) per sample of each tower."""
    from pretrain.clip_model import build_clip

    with torch.device("meta"):
        clip = build_clip(cfg)
        size = cfg.image.image_size
        image = torch.empty(1, 3, size, size)
        text = torch.zeros(1, cfg.text.context_length, dtype=torch.long)
    flops = {}
    for tower, run in (("image", lambda: clip.encode_image(image)),
                       ("text", lambda: clip.encode_text(text))):
        with FlopCounterMode(display=False) as counter:
            run()
        flops[tower] = float(counter.get_total_flops())
    return flops


def train_flops_per_sample(cfg: ModelConfig) -> float:
    """Training FLOPs per sample: forward + backward is about three forwards."""
    return 3.0 * sum(clip_forward_flops(cfg).values())
