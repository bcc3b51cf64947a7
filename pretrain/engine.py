"""The DeepSpeed Trainer every job shares: engine, loop, guards, checkpoints and metrics.

One object owns model, optimizer, schedule and data stream, so one checkpoint restores them
all (torchtitan's shape). A job subclasses :class:`Trainer` and supplies the model-plus-loss
module, its parameter groups, its data loader, the loss of a batch and its export; pretraining
(:class:`pretrain.clip_trainer.ClipTrainer`) and fine-tuning share everything else. Every rank
runs the same code; rank 0 also logs and exports.
"""

from __future__ import annotations

import json
import signal
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from tqdm import tqdm

from pretrain.checkpoint import Checkpointer, capture_rng_state, restore_rng_state
from pretrain.config import save_config
from pretrain.data import StreamState, TrainLoader
from pretrain.deepspeed_config import deepspeed_config
from pretrain.distributed import barrier, init_distributed
from pretrain.metrics import MetricsLogger, peak_memory_gb

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingAborted(RuntimeError):
    """The run cannot continue (e.g. too many non-finite losses in a row)."""


class Trainer(ABC):
    """Runs ``cfg.train.steps`` optimizer steps of a job under DeepSpeed.

    The config must have sections ``train`` (steps, seed, grad_accum, max_nonfinite_batches and
    the optimizer fields), ``deepspeed``, ``log`` and ``checkpoint``.
    """

    # Training FLOPs per sample (set by a job that knows them, on rank 0) for MFU.
    flops_per_sample: float = 0.0
    progress_label: str = "train"

    def __init__(self, cfg: Any, run_dir: Path, micro_batch: int, num_workers: int) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        init_distributed(cfg.deepspeed.backend)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.micro_batch = micro_batch
        self.global_batch = micro_batch * cfg.train.grad_accum * self.world_size
        self.ds_config = deepspeed_config(cfg.deepspeed, cfg.train, micro_batch, self.world_size)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            (self.run_dir / "deepspeed.json").write_text(json.dumps(self.ds_config, indent=2))

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        with deepspeed.zero.Init(config_dict_or_path=self.ds_config,
                                 enabled=cfg.deepspeed.zero_stage == 3):
            task = self.build_task()
        self.engine, _, _, _ = deepspeed.initialize(
            model=task, model_parameters=self.param_groups(task), config=self.ds_config)
        torch.manual_seed(cfg.train.seed + 1 + self.rank)  # per-rank stochastic depth etc.
        self.device = self.engine.device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            cfg.deepspeed.precision, torch.float32)

        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint.keep,
                                         self.rank)
        self.step = 0
        self.nonfinite_batches = 0  # dropped micro-batches, over the whole run
        self.nonfinite_in_a_row = 0
        self.loader = self.build_loader(self._resume(num_workers))
        self.metrics = MetricsLogger(self.run_dir, cfg.model_dump(mode="json"), cfg.log.wandb,
                                     enabled=self.is_main, resume_step=self.step)
        self._stop_signal: int | None = None
        for signum in PREEMPTION_SIGNALS:
            signal.signal(signum, self._request_stop)

    # ------------------------------------------------------------------ what a job supplies
    @abstractmethod
    def build_task(self) -> torch.nn.Module:
        """The module DeepSpeed trains; its forward takes a batch's tensors, returns the loss."""

    @abstractmethod
    def param_groups(self, task: torch.nn.Module) -> list[dict[str, Any]]:
        """Optimizer parameter groups (each may carry its own ``lr`` and ``weight_decay``)."""

    @abstractmethod
    def build_loader(self, state: StreamState) -> TrainLoader:
        """This rank's training stream, starting at ``state``."""

    @abstractmethod
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss of one micro-batch (through ``self.engine``)."""

    @abstractmethod
    def export(self) -> None:
        """Rank 0, after the final checkpoint: write the run's deliverable weights."""

    def extra_metrics(self) -> dict[str, Any]:
        """Job-specific values for each log record (called on every rank)."""
        return {}

    # ------------------------------------------------------------------ resume
    def _resume(self, num_workers: int) -> StreamState:
        """Restore the latest checkpoint of this run directory, if any."""
        restored = self.checkpointer.load(self.engine)
        if restored is None:
            return StreamState.fresh(num_workers)
        client_state, rank_state = restored
        self.step = int(client_state["step"])
        self.nonfinite_batches = int(client_state.get("nonfinite_batches", 0))
        restore_rng_state(rank_state["rng"])
        if self.is_main:
            print(f"resumed from {self.checkpointer.latest_tag()} at step {self.step}")
        return StreamState.from_dict(rank_state["data"])

    def save(self) -> None:
        client_state = {"step": self.step, "samples_seen": self.samples_seen,
                        "nonfinite_batches": self.nonfinite_batches}
        rank_state = {"rng": capture_rng_state(), "data": self.loader.state_dict()}
        self.checkpointer.save(self.engine, self.step, client_state, rank_state)

    # ------------------------------------------------------------------ loop
    def _request_stop(self, signum: int, frame: Any) -> None:
        self._stop_signal = signum

    @property
    def samples_seen(self) -> int:
        return self.step * self.global_batch

    def train(self) -> str:
        """Run to ``train.steps``; returns ``"completed"`` or ``"preempted"``."""
        try:
            outcome = self._train_loop()
        finally:
            self.loader.close()
            self.metrics.close()
        if outcome == "completed" and self.is_main:
            self.export()
        barrier()
        return outcome

    def _train_loop(self) -> str:
        cfg = self.cfg
        bar = tqdm(total=cfg.train.steps, initial=self.step, desc=self.progress_label,
                   unit="step", disable=not (self.is_main and cfg.log.progress),
                   dynamic_ncols=True)
        window = _Window()
        try:
            while self.step < cfg.train.steps:
                loss, stop = self.train_step(window)
                self.step += 1
                bar.update(1)
                window.add_loss(loss)
                if self.step % cfg.log.every == 0 or self.step == cfg.train.steps:
                    record = self._log_record(window)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                    self.metrics.log(record)
                    window = _Window()
                if stop:
                    self.save()
                    return "preempted"
                if self.step % cfg.checkpoint.every == 0 or self.step == cfg.train.steps:
                    self.save()
        finally:
            bar.close()
        return "completed"

    def train_step(self, window: _Window) -> tuple[float, bool]:
        """One optimizer step over ``grad_accum`` finite micro-batches. Returns (loss, stop).

        Ranks agree on two flags per micro-batch with one tiny all-reduce: whether any rank's
        loss is non-finite and whether any rank received a preemption signal. A non-finite
        micro-batch is dropped on every rank before its backward and replaced by the next
        one: no update sees it, and DeepSpeed's micro-step count, which places its gradient
        accumulation boundaries, stays exactly ``grad_accum`` per optimizer step (skipping
        only the backward would move the boundary into the next step). A preemption signal
        ends the run after this step.
        """
        train = self.cfg.train
        losses: list[torch.Tensor] = []
        stop = False
        while len(losses) < train.grad_accum:
            start = time.perf_counter()
            batch = next(self.loader)
            fetched = time.perf_counter()
            loss = self.forward(batch)
            flags = torch.tensor([0.0 if torch.isfinite(loss) else 1.0,
                                  1.0 if self._stop_signal is not None else 0.0])
            if self.world_size > 1:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            stop = stop or bool(flags[1])
            if flags[0] == 0:
                self.engine.backward(loss)
                self.engine.step()
                losses.append(loss.detach().float())
                self.nonfinite_in_a_row = 0
            else:
                self.nonfinite_batches += 1
                self.nonfinite_in_a_row += 1
                if self.nonfinite_in_a_row >= train.max_nonfinite_batches:
                    raise TrainingAborted(
                        f"{self.nonfinite_in_a_row} non-finite losses in a row at step "
                        f"{self.step + 1}; stopping without saving (the last checkpoint is "
                        "intact)")
            window.add_time(data=fetched - start, compute=time.perf_counter() - fetched)
        return float(torch.stack(losses).mean()), stop

    def to_device(self, tensor: torch.Tensor, floating: bool = False) -> torch.Tensor:
        dtype = self.dtype if floating else None
        return tensor.to(self.device, dtype=dtype, non_blocking=True)

    def _log_record(self, window: _Window) -> dict[str, Any]:
        sums = torch.tensor([window.loss_sum, float(self.loader.state.skipped)],
                            dtype=torch.float64)
        peak = torch.tensor([peak_memory_gb()], dtype=torch.float64)
        if self.world_size > 1:
            dist.all_reduce(sums)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        samples_per_s = window.steps * self.global_batch / max(window.elapsed, 1e-9)
        busy = window.data_s + window.compute_s
        record = {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "loss": (sums[0] / (window.steps * self.world_size)).item(),
            "lr": self.engine.get_lr()[0],
            "samples_per_s": samples_per_s,
            "samples_per_s_per_device": samples_per_s / self.world_size,
            "data_wait_s": window.data_s,
            "compute_s": window.compute_s,
            "data_wait_fraction": window.data_s / max(busy, 1e-9),
            "peak_memory_gb": peak.item(),
            "skipped_samples": int(sums[1].item()),
            "nonfinite_batches": self.nonfinite_batches,
            **self.extra_metrics(),
        }
        peak_flops = self.cfg.log.peak_flops_per_device
        if peak_flops and self.flops_per_sample:
            record["mfu"] = samples_per_s * self.flops_per_sample / (peak_flops * self.world_size)
        return record


class _Window:
    """Accumulates loss and timings between two log records."""

    def __init__(self) -> None:
        self.began = time.perf_counter()
        self.loss_sum = self.steps = 0
        self.data_s = self.compute_s = 0.0

    def add_loss(self, loss: float) -> None:
        self.steps += 1
        self.loss_sum += loss

    def add_time(self, data: float, compute: float) -> None:
        self.data_s += data
        self.compute_s += compute

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.began
