"""Training FLOPs of an image model, counted on the meta device (no memory, no compute), for MFU."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def image_model_train_flops(build: Callable[[], torch.nn.Module], image_size: int) -> float:
    """Training FLOPs per sample of an image model (e.g. a fine-tuning classifier): three
    forwards of one ``image_size`` image, counted on the meta device."""
    with torch.device("meta"):
        model = build()
        image = torch.empty(1, 3, image_size, image_size)
    with FlopCounterMode(display=False) as counter:
        model(image)
    return 3.0 * float(counter.get_total_flops())
