"""Contrastive (CLIP / SigLIP) pretraining of an image encoder against a text encoder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import deepspeed
import torch

from data_tools.mixture import load_mixture
from pretrain.config import PretrainConfig, TrainConfig
from pretrain.data import StreamState, TrainLoader, build_train_loader
from pretrain.engine import Trainer
from pretrain.export import export_from_checkpoint
from pretrain.flops import train_flops_per_sample
from pretrain.loss import ContrastiveTask, build_loss
from pretrain.models.clip import build_clip, build_tokenizer


def clip_param_groups(task: torch.nn.Module, train: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups per tower (own lr each), without weight decay for norms, biases, position
    embeddings and the learned temperature/bias (as open_clip does)."""
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, param in task.named_parameters():
        if not param.requires_grad:
            continue
        tower = "image" if name.startswith("clip.visual.") else "text"
        no_decay = (param.ndim < 2 or name.endswith(".bias") or "logit_" in name
                    or "positional_embedding" in name)
        lr = (train.image_lr if tower == "image" else train.text_lr) or train.lr
        group = groups.setdefault((tower, no_decay), {
            "params": [], "lr": lr, "weight_decay": 0.0 if no_decay else train.weight_decay,
            "name": f"{tower}_{'no_decay' if no_decay else 'decay'}",
        })
        group["params"].append(param)
    return list(groups.values())


class ClipTrainer(Trainer):
    progress_label = "pretrain"

    def __init__(self, cfg: PretrainConfig, run_dir: Path) -> None:
        super().__init__(cfg, run_dir, micro_batch=cfg.data.batch_size,
                         num_workers=cfg.data.workers)
        self.flops_per_sample = train_flops_per_sample(cfg.model) if self.is_main else 0.0

    def build_task(self) -> torch.nn.Module:
        cfg = self.cfg
        logit_bias = -10.0 if cfg.loss.kind == "siglip" else None
        clip = build_clip(cfg.model, init_logit_bias=logit_bias)
        loss = build_loss(cfg.loss, self.rank, self.world_size)
        return ContrastiveTask(clip, loss, cfg.loss.max_logit_scale)

    def param_groups(self, task: torch.nn.Module) -> list[dict[str, Any]]:
        return clip_param_groups(task, self.cfg.train)

    def build_loader(self, state: StreamState) -> TrainLoader:
        cfg = self.cfg
        return build_train_loader(
            shard_sets=load_mixture(cfg.data.mixture_spec),
            tokenize=build_tokenizer(cfg.model.text.context_length),
            image_size=cfg.model.image.image_size,
            batch_size=cfg.data.batch_size,
            num_workers=cfg.data.workers,
            seed=cfg.train.seed,
            rank=self.rank,
            shuffle_buffer=cfg.data.shuffle_buffer,
            shuffle_initial=cfg.data.shuffle_initial,
            scale=cfg.data.scale,
            state=state,
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.engine(self.to_device(batch["image"], floating=True),
                           self.to_device(batch["text"]))

    def export(self) -> None:
        export_from_checkpoint(self.run_dir)

    def extra_metrics(self) -> dict[str, Any]:
        param = self.engine.module.clip.logit_scale
        with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
            scale = param.detach().float().exp().clamp(max=self.cfg.loss.max_logit_scale)
        return {"logit_scale": scale.item()}

