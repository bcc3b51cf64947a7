"""Learning-rate schedules of every recipe, resolved to optimizer steps.

A :class:`~pretrain.config.ScheduleConfig` may speak in epochs; once the job knows how many
optimizer steps an epoch is (samples per epoch / global batch), :func:`resolve_schedule` turns it
into a :class:`Schedule` in steps. The schedule is a pure function of the step, handed to
DeepSpeed as a ``LambdaLR`` over each parameter group's own lr (so per-tower rates and layer-wise
decay survive it); DeepSpeed steps it once per optimizer step and checkpoints its position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

from pretrain.engine.config import ScheduleConfig, check_warmup


@dataclass(frozen=True)
class Schedule:
    total_steps: int
    warmup_steps: int
    warmup_start: float
    decay: str
    min_lr_ratio: float
    power: float
    milestones: tuple[int, ...]
    gamma: float

    def factor(self, step: int) -> float:
        """The lr multiplier for optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.warmup_start + (1.0 - self.warmup_start) * step / self.warmup_steps
        if self.decay == "step":
            return self.gamma ** sum(step >= milestone for milestone in self.milestones)
        if self.decay == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.decay == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:  # poly
            shape = (1.0 - progress) ** self.power
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape

    def scheduler(self, optimizer: torch.optim.Optimizer) -> LambdaLR:
        return LambdaLR(optimizer, self.factor)


def steps_per_epoch(epoch_samples: int, global_batch: int) -> int:
    return max(1, math.ceil(epoch_samples / global_batch))


def resolve_schedule(cfg: ScheduleConfig, epoch_samples: int | None, global_batch: int
                     ) -> Schedule:
    """``cfg`` in optimizer steps. ``epoch_samples`` (samples in one epoch of the training data)
    is needed only when the config speaks in epochs; without it that is an error naming the
    fields that would supply it."""
    if cfg.epochs is None:
        per_epoch, total = 1, int(cfg.steps)
    else:
        if epoch_samples is None:
            raise ValueError("schedule.epochs needs the size of the training data: give the "
                             "shards a sizes.json or set data.epoch_samples")
        per_epoch = steps_per_epoch(epoch_samples, global_batch)
        total = max(1, round(cfg.epochs * per_epoch))
    warmup = cfg.warmup_steps
    if cfg.warmup_epochs is not None:
        warmup = round(cfg.warmup_epochs * per_epoch)
    check_warmup(warmup, total)
    return Schedule(
        total_steps=total, warmup_steps=warmup, warmup_start=cfg.warmup_start, decay=cfg.decay,
        min_lr_ratio=cfg.min_lr_ratio, power=cfg.power,
        milestones=tuple(round(m * per_epoch) for m in cfg.milestones), gamma=cfg.gamma)
