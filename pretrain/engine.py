"""The pretraining Trainer: builds the CLIP task under DeepSpeed and owns the training loop.

One object owns model, optimizer, schedule and data stream, so one checkpoint restores them
all (torchtitan's shape). Every rank runs the same code; rank 0 also logs and exports.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from tqdm import tqdm

from data_tools.mixture import load_mixture
from pretrain.checkpoint import Checkpointer, capture_rng_state, restore_rng_state
from pretrain.config import PretrainConfig, TrainConfig, save_config
from pretrain.data import StreamState, build_train_loader
from pretrain.deepspeed_config import deepspeed_config
from pretrain.export import export_from_checkpoint
from pretrain.flops import train_flops_per_sample
from pretrain.loss import ContrastiveTask, build_loss
from pretrain.metrics import MetricsLogger, peak_memory_gb
from pretrain.models.clip import build_clip, build_tokenizer

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingAborted(RuntimeError):
    """The run cannot continue (e.g. too many non-finite losses in a row)."""


def init_distributed(backend: str) -> None:
    """Join the process group the launcher describes (or a group of one without a launcher)."""
    if dist.is_initialized():
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        os.environ.setdefault(key, value)
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)


def param_groups(task: torch.nn.Module, train: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups per tower, without weight decay for norms, biases, embeddings of position
    and the learned temperature/bias (as open_clip does)."""
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


class Trainer:
    def __init__(self, cfg: PretrainConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        init_distributed(cfg.deepspeed.backend)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.micro_batch = cfg.data.batch_size
        self.global_batch = self.micro_batch * cfg.train.grad_accum * self.world_size
        self.ds_config = deepspeed_config(cfg.deepspeed, cfg.train, self.micro_batch,
                                          self.world_size)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            (self.run_dir / "deepspeed.json").write_text(json.dumps(self.ds_config, indent=2))

        self.engine = self._build_engine()
        self.device = self.engine.device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            cfg.deepspeed.precision, torch.float32)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint.keep,
                                         self.rank)
        self.step = 0
        self.nonfinite_steps = 0
        stream_state = self._resume()
        self.loader = build_train_loader(
            shard_sets=load_mixture(_mixture_spec(cfg)),
            tokenize=build_tokenizer(cfg.model.text.context_length),
            image_size=cfg.model.image.image_size,
            batch_size=self.micro_batch,
            num_workers=cfg.data.workers,
            seed=cfg.train.seed,
            rank=self.rank,
            shuffle_buffer=cfg.data.shuffle_buffer,
            shuffle_initial=cfg.data.shuffle_initial,
            scale=cfg.data.scale,
            state=stream_state,
        )
        self.flops_per_sample = train_flops_per_sample(cfg.model) if self.is_main else 0.0
        self.metrics = MetricsLogger(self.run_dir, cfg.model_dump(mode="json"), cfg.log.wandb,
                                     enabled=self.is_main, resume_step=self.step)
        self._stop_signal: int | None = None
        for signum in PREEMPTION_SIGNALS:
            signal.signal(signum, self._request_stop)

    # ------------------------------------------------------------------ construction
    def _build_engine(self) -> Any:
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        with deepspeed.zero.Init(config_dict_or_path=self.ds_config,
                                 enabled=cfg.deepspeed.zero_stage == 3):
            clip = build_clip(cfg.model, init_logit_bias=-10.0 if cfg.loss.kind == "siglip"
                              else None)
        task = ContrastiveTask(clip, build_loss(cfg.loss, self.rank, self.world_size),
                               cfg.loss.max_logit_scale)
        engine, _, _, _ = deepspeed.initialize(
            model=task, model_parameters=param_groups(task, cfg.train), config=self.ds_config)
        torch.manual_seed(cfg.train.seed + 1 + self.rank)  # per-rank stochastic depth etc.
        return engine

    def _resume(self) -> StreamState:
        """Restore the latest checkpoint of this run directory, if any."""
        restored = self.checkpointer.load(self.engine)
        if restored is None:
            return StreamState.fresh(self.cfg.data.workers)
        client_state, rank_state = restored
        self.step = int(client_state["step"])
        self.nonfinite_steps = int(client_state.get("nonfinite_steps", 0))
        restore_rng_state(rank_state["rng"])
        if self.is_main:
            print(f"resumed from {self.checkpointer.latest_tag()} at step {self.step}")
        return StreamState.from_dict(rank_state["data"])

    # ------------------------------------------------------------------ loop
    def _request_stop(self, signum: int, frame: Any) -> None:
        self._stop_signal = signum

    @property
    def samples_seen(self) -> int:
        return self.step * self.global_batch

    def train(self) -> str:
        """Run to ``train.steps``; returns ``"completed"`` or ``"preempted"``."""
        cfg = self.cfg
        bar = tqdm(total=cfg.train.steps, initial=self.step, desc="pretrain", unit="step",
                   disable=not (self.is_main and cfg.log.progress), dynamic_ncols=True)
        window = _Window()
        consecutive_bad = 0
        outcome = "completed"
        while self.step < cfg.train.steps:
            loss, finite, stop = self.train_step(window)
            self.step += 1
            bar.update(1)
            if finite:
                consecutive_bad = 0
            else:
                self.nonfinite_steps += 1
                consecutive_bad += 1
                if consecutive_bad >= cfg.train.max_nonfinite_steps:
                    bar.close()
                    self.metrics.close()
                    raise TrainingAborted(
                        f"{consecutive_bad} non-finite losses in a row at step {self.step}; "
                        "stopping without saving (the last checkpoint is intact)")
            window.add_loss(loss)
            if self.step % cfg.log.every == 0 or self.step == cfg.train.steps:
                record = self._log_record(window)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                self.metrics.log(record)
                window = _Window()
            if stop:
                outcome = "preempted"
                self.save()
                break
            if self.step % cfg.checkpoint.every == 0 or self.step == cfg.train.steps:
                self.save()
        bar.close()
        if outcome == "completed" and self.is_main:
            export_from_checkpoint(self.run_dir)
        _barrier()
        self.metrics.close()
        return outcome

    def train_step(self, window: _Window) -> tuple[float, bool, bool]:
        """One optimizer step over ``grad_accum`` micro-batches. Returns (loss, finite, stop).

        Ranks agree on two flags per micro-batch with one tiny all-reduce: whether any rank's
        loss is non-finite (then every rank skips the backward, so the update is skipped) and
        whether any rank received a preemption signal.
        """
        losses, finite, stop = [], True, False
        for _ in range(self.cfg.train.grad_accum):
            start = time.perf_counter()
            batch = next(self.loader)
            fetched = time.perf_counter()
            image = batch["image"].to(self.device, dtype=self.dtype, non_blocking=True)
            text = batch["text"].to(self.device, non_blocking=True)
            loss = self.engine(image, text)
            flags = torch.tensor([0.0 if torch.isfinite(loss) else 1.0,
                                  1.0 if self._stop_signal is not None else 0.0])
            if self.world_size > 1:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            finite, stop = finite and flags[0] == 0, stop or bool(flags[1])
            if flags[0] == 0:
                self.engine.backward(loss)
                self.engine.step()
                losses.append(loss.detach().float())
            window.add_time(data=fetched - start, compute=time.perf_counter() - fetched)
        mean = torch.stack(losses).mean() if losses else torch.tensor(math.nan)
        return float(mean), bool(finite), stop

    def _log_record(self, window: _Window) -> dict[str, Any]:
        stats = torch.tensor([window.loss_sum, window.loss_count, float(self.loader.state.skipped),
                              peak_memory_gb()], dtype=torch.float64)
        if self.world_size > 1:
            summed = stats[:3].clone()
            dist.all_reduce(summed)
            peak = stats[3:].clone()
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            stats = torch.cat([summed, peak])
        loss = (stats[0] / stats[1]).item() if stats[1] > 0 else math.nan
        samples_per_s = window.steps * self.global_batch / max(window.elapsed, 1e-9)
        record = {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "loss": loss,
            "lr": self.engine.get_lr()[0],
            "samples_per_s": samples_per_s,
            "samples_per_s_per_device": samples_per_s / self.world_size,
            "data_wait_s": window.data_s,
            "compute_s": window.compute_s,
            "data_wait_fraction": window.data_s / max(window.data_s + window.compute_s, 1e-9),
            "peak_memory_gb": stats[3].item(),
            "skipped_samples": int(stats[2].item()),
            "nonfinite_steps": self.nonfinite_steps,
            "logit_scale": self._logit_scale(),
        }
        peak = self.cfg.log.peak_flops_per_device
        if peak:
            record["mfu"] = samples_per_s * self.flops_per_sample / (peak * self.world_size)
        return record

    def _logit_scale(self) -> float:
        param = self.engine.module.clip.logit_scale
        with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
            return float(param.detach().float().exp().clamp(max=self.cfg.loss.max_logit_scale))

    def save(self) -> None:
        client_state = {"step": self.step, "samples_seen": self.samples_seen,
                        "nonfinite_steps": self.nonfinite_steps}
        rank_state = {"rng": capture_rng_state(), "data": self.loader.state_dict()}
        self.checkpointer.save(self.engine, self.step, client_state, rank_state)


class _Window:
    """Accumulates loss and timings between two log records."""

    def __init__(self) -> None:
        self.began = time.perf_counter()
        self.loss_sum = self.loss_count = self.steps = 0
        self.data_s = self.compute_s = 0.0

    def add_loss(self, loss: float) -> None:
        self.steps += 1
        if math.isfinite(loss):
            self.loss_sum += loss
            self.loss_count += 1

    def add_time(self, data: float, compute: float) -> None:
        self.data_s += data
        self.compute_s += compute

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.began


def _mixture_spec(cfg: PretrainConfig) -> str | list:
    train = cfg.data.train
    return train if isinstance(train, str) else [s.model_dump() for s in train]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
