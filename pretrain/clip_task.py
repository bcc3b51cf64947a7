"""Contrastive (CLIP / SigLIP) pretraining of an image encoder against a text encoder, as a task
of the shared trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import deepspeed
import torch

from data_tools.mixture import check_samples, load_mixture
from pretrain.clip_eval import clip_evaluators
from pretrain.clip_model import build_clip, build_tokenizer
from pretrain.config import PretrainConfig
from pretrain.data import build_train_loader, eval_transform
from pretrain.engine import distributed
from pretrain.engine.skipped import SkipLog
from pretrain.engine.stream import StreamState, TrainLoader
from pretrain.engine.task import Evaluator, Task, stream_epoch_samples
from pretrain.export import write_clip_exports
from pretrain.flops import train_flops_per_sample
from pretrain.loss import ContrastiveTask, build_loss
from pretrain.warm_start import check_warm_start, warm_start


def clip_param_groups(task: torch.nn.Module, cfg: PretrainConfig) -> list[dict[str, Any]]:
    """AdamW groups per tower (own lr each), without weight decay for norms, biases, position
    embeddings and the learned temperature/bias (as open_clip does)."""
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    optimizer, model = cfg.optimizer, cfg.model
    for name, param in task.named_parameters():
        if not param.requires_grad:
            continue
        tower = "image" if name.startswith("clip.visual.") else "text"
        no_decay = (param.ndim < 2 or name.endswith(".bias") or "logit_" in name
                    or "positional_embedding" in name)
        lr = (model.image.lr if tower == "image" else model.text.lr) or optimizer.lr
        group = groups.setdefault((tower, no_decay), {
            "params": [], "lr": lr, "weight_decay": 0.0 if no_decay else optimizer.weight_decay,
            "name": f"{tower}_{'no_decay' if no_decay else 'decay'}",
        })
        group["params"].append(param)
    return list(groups.values())


class ClipTask(Task):
    label = "pretrain"
    cfg: PretrainConfig

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__(cfg)
        self.shard_sets = load_mixture(cfg.data.mixture_spec, cfg.data.remote.policy())

    @classmethod
    def check_inputs(cls, cfg: PretrainConfig) -> None:
        """Every local shard exists, probed remote ones answer with a tar, every set has
        samples (an empty one would hang training), and warm-start weights fit the model."""
        remote = cfg.data.remote
        sets = load_mixture(cfg.data.mixture_spec, remote.policy())
        check_samples(sets, remote.policy(), remote.probe_shards)
        unsized = [s.pattern for s in sets if s.num_samples is None]
        if cfg.schedule.epochs is not None and cfg.data.epoch_samples is None and unsized:
            raise ValueError(f"schedule.epochs needs the size of the training data, but shard set "
                             f"{unsized[0]!r} has no sizes.json beside its shards: add one or set "
                             "data.epoch_samples")
        init = cfg.model.init_from
        if init.clip is not None or init.image is not None:
            check_warm_start(cfg.model)  # builds the model on the meta device

    def build_module(self) -> torch.nn.Module:
        cfg = self.cfg
        logit_bias = -10.0 if cfg.loss.kind == "siglip" else None
        clip = build_clip(cfg.model, init_logit_bias=logit_bias)
        warm_start(clip, cfg.model.init_from)
        loss = build_loss(cfg.loss, distributed.rank(), distributed.world_size())
        return ContrastiveTask(clip, loss, cfg.loss.max_logit_scale)

    def param_groups(self, module: torch.nn.Module) -> list[dict[str, Any]]:
        return clip_param_groups(module, self.cfg)

    def epoch_samples(self) -> int | None:
        return stream_epoch_samples(self.shard_sets, self.cfg.data.epoch_samples)

    def build_loader(self, rank: int, state: StreamState) -> TrainLoader:
        cfg = self.cfg
        return build_train_loader(
            shard_sets=self.shard_sets,
            tokenize=build_tokenizer(cfg.model.text.context_length),
            image_size=cfg.model.image.image_size,
            batch_size=cfg.data.batch_size,
            num_workers=cfg.data.workers,
            seed=cfg.train.seed,
            rank=rank,
            shuffle_buffer=cfg.data.shuffle_buffer,
            shuffle_initial=cfg.data.shuffle_initial,
            scale=cfg.data.scale,
            state=state,
            jpeg_draft=cfg.data.jpeg_draft,
            remote=cfg.data.remote.policy(),
            skip_log=SkipLog(self.run_dir, rank),
        )

    def evaluator(self, rank: int, world_size: int) -> dict[str, Evaluator]:
        cfg = self.cfg
        return clip_evaluators(
            cfg.eval.zero_shot, cfg.eval.retrieval, eval_transform(cfg.model.image.image_size),
            build_tokenizer(cfg.model.text.context_length), cfg.eval.batch_size,
            cfg.data.workers, rank, world_size)

    def export(self, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        write_clip_exports(state_dict, self.cfg.model.model_dump(mode="json"), out_dir)

    def flops_per_sample(self) -> float:
        return train_flops_per_sample(self.cfg.model)

    def log_values(self, module: torch.nn.Module) -> dict[str, float]:
        param = module.clip.logit_scale
        with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
            scale = param.detach().float().exp().clamp(max=self.cfg.loss.max_logit_scale)
        return {"logit_scale": scale.item()}
