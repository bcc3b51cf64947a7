"""An EMA of the classifier's weights (timm's ``ModelEmaV3``) that resumes with the checkpoint.

Where it lives: every rank keeps a full fp32 copy beside its module and updates it after every
optimizer step from the module's (identical, under ZeRO 0, 1 and 2) weights, so every rank can
evaluate it on its own validation slice with no collective. In fp32 because a bf16 EMA cannot
hold an update of ``(1 - decay) x (model - ema)`` at decay 0.9998 (timm would round it
stochastically; fp32 needs no RNG, so resume stays exact). ZeRO-3 is refused by the config: its
ranks hold only a partition of each parameter, so a full copy per rank would defeat it.

The EMA is saved in the rank's checkpoint file (``Task.state_dict``), on the CPU.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.utils import ModelEmaV3
from torch import nn

from finetune.config import EmaConfig


class WeightsEma:
    """Created from the live module at the first step or resume (when DeepSpeed has placed and
    cast it), then updated in place."""

    def __init__(self, cfg: EmaConfig) -> None:
        self.cfg = cfg
        self.ema: ModelEmaV3 | None = None
        self.updates = 0

    def _create(self, model: nn.Module) -> ModelEmaV3:
        device = next(model.parameters()).device
        return ModelEmaV3(model, decay=self.cfg.decay, use_warmup=self.cfg.warmup,
                          device=device, dtype=torch.float32)

    @property
    def module(self) -> nn.Module | None:
        """The averaged model (eval mode), or ``None`` before the first step."""
        return None if self.ema is None else self.ema.module

    def update(self, model: nn.Module, step: int) -> None:
        if self.ema is None:
            self.ema = self._create(model)
        self.ema.update(model, step=step)
        self.updates = step

    def state_dict(self) -> dict[str, Any]:
        if self.ema is None:
            return {}
        weights = {k: v.detach().to("cpu", copy=True) for k, v in
                   self.ema.module.state_dict().items()}
        return {"weights": weights, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        if not state:
            return
        self.ema = self._create(model)
        self.ema.module.load_state_dict(state["weights"], strict=True)
        self.updates = int(state["updates"])
