"""What a job supplies to the shared :class:`~pretrain.engine.trainer.Trainer`: a :class:`Task`.

The trainer owns the engine, the loop, the guards, checkpoints, metrics and the evaluation
cadence, once. A task is small: its module (whose forward returns the loss and its named parts),
parameter groups, training stream, evaluator and export. Pretraining (``ClipTask``) and every
fine-tuning task (classification, detection, segmentation) are tasks.

Batches are dicts whose values may be tensors or lists/dicts of tensors (per-image targets of
different sizes, such as boxes and masks); the trainer moves all of them to the engine's device
and casts the floating tensors under :attr:`Task.input_keys` to the compute dtype (bf16 on GPUs),
leaving targets in their own precision.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data_tools.mixture import ShardSet
from pretrain.engine.config import JobConfig
from pretrain.engine.skipped import SkipLog
from pretrain.engine.stream import StreamState, TrainLoader

Batch = dict[str, Any]
LossOutput = dict[str, torch.Tensor]  # "loss" (what is minimised) + named parts, all scalars


class Evaluator(ABC):
    """Evaluation over this rank's slice of a validation split, reduced across ranks.

    The trainer calls :meth:`reset`, then :meth:`update` once per batch of :meth:`batches`
    (module in eval mode, no gradients, batch on the device), then :meth:`compute`, a collective
    every rank calls, which returns the metrics every rank agrees on. Under ZeRO-3 every forward
    is collective, so the trainer keeps the ranks in step when their slices differ in length:
    a rank that has run out repeats its last batch with ``counted=False``.
    """

    @abstractmethod
    def batches(self) -> Iterable[Batch]:
        """This rank's slice of the split, as CPU batches."""

    def prepare(self, module: nn.Module) -> None:  # noqa: B027 (optional hook)
        """Called on every rank after :meth:`reset`, before the batches, with the module in
        eval mode: work every evaluation needs once (e.g. the text embeddings of zero-shot
        class prompts). Under ZeRO-3 its forwards are collective, so every rank must run the
        same ones."""

    @abstractmethod
    def reset(self) -> None:
        """Forget what earlier evaluations accumulated."""

    @abstractmethod
    def update(self, module: nn.Module, batch: Batch, counted: bool) -> None:
        """Run the module on ``batch``; accumulate its results only if ``counted``."""

    @abstractmethod
    def compute(self) -> dict[str, float]:
        """Collective: reduce the ranks' accumulations and return the metrics."""


class Task(ABC):
    """One kind of job: what it trains, on what data, how it is judged and what it delivers."""

    label: str = "train"  # progress bar and exit message
    input_keys: tuple[str, ...] = ("image",)
    # False: ``precision: bf16`` makes DeepSpeed hold bf16 weights (fp32 master copies in the
    # optimizer), and the floating inputs are cast to bf16. True: the weights stay fp32 and the
    # task's module runs its forward under ``torch.autocast`` itself (detection, whose box
    # arithmetic in pixel coordinates needs fp32: bf16 resolves 8 px at x = 1333).
    autocast: bool = False
    # Where the trainer writes this run (set before :meth:`evaluator` is called), for tasks
    # whose evaluation writes files (detection's results JSON).
    run_dir: Path | None = None
    # The file of ``RUN_DIR/export/`` that ``--eval-only`` evaluates; None: the job has no
    # evaluation-only mode (:mod:`pretrain.engine.eval_only`).
    eval_only_export: str | None = None

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def build_module(self) -> nn.Module:
        """The module DeepSpeed trains: ``forward(batch) -> LossOutput``."""

    @abstractmethod
    def param_groups(self, module: nn.Module) -> list[dict[str, Any]]:
        """Optimizer parameter groups; each may carry its own ``lr`` and ``weight_decay``."""

    @abstractmethod
    def build_loader(self, rank: int, state: StreamState) -> TrainLoader:
        """This rank's training stream, starting at ``state``."""

    @abstractmethod
    def export(self, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        """Rank 0, after the last checkpoint: write the deliverable from the consolidated fp32
        weights of the module (keys as in ``build_module().state_dict()``)."""

    @classmethod  # noqa: B027 (nothing to check by default)
    def check_inputs(cls, cfg: JobConfig) -> None:
        """Raise ``FileNotFoundError`` / ``ValueError`` in one line naming an input the config
        names that is missing or unusable (shards, folders, weights). Runs before any process
        group: ``--check`` on a login node, and every rank at start-up."""

    def eval_only_file(self, export_dir: Path) -> Path | None:
        """The export ``--eval-only`` evaluates, if the job has that mode (named in the message
        of a failed final evaluation)."""
        return None if self.eval_only_export is None else export_dir / self.eval_only_export

    # ------------------------------------------------------------------ --eval-only
    @classmethod
    def for_checkpoint(cls, cfg: JobConfig, checkpoint: Path) -> Task:
        """The task set up to evaluate ``checkpoint`` (``--eval-only``), reading no training
        data; before any process group, so a ``ValueError`` here is one line."""
        return cls(cfg)

    def load_checkpoint(self, checkpoint: Path) -> nn.Module:
        """The module (as :meth:`build_module` builds it) holding ``checkpoint``'s weights, on
        the CPU; ``ValueError`` in one line when they are another model's."""
        raise ValueError(f"{self.label} jobs have no evaluation-only mode")

    def checkpoint_evaluation(self, checkpoint: Path, rank: int, world_size: int
                              ) -> tuple[nn.Module, Evaluator]:
        """The module holding ``checkpoint``'s weights and the evaluator that scores it: by
        default :meth:`load_checkpoint` and the in-training :meth:`evaluator` (which must then
        be a single one)."""
        return self.load_checkpoint(checkpoint), self.evaluator(rank, world_size)

    def skip_log(self, rank: int) -> SkipLog:
        """Where this rank's streams list the files they skip (``RUN_DIR/skipped.jsonl``;
        nowhere before the trainer sets :attr:`run_dir`)."""
        return SkipLog(self.run_dir, rank)

    def epoch_samples(self) -> int | None:
        """Samples in one epoch of the training data (for schedules in epochs), if known."""
        return getattr(self.cfg.data, "epoch_samples", None)

    def prepare_batch(self, batch: Batch) -> Batch:
        """Last change to a batch on the device before the forward (e.g. mixup)."""
        return batch

    def evaluator(self, rank: int, world_size: int) -> Evaluator | dict[str, Evaluator] | None:
        """The in-training evaluation, if the task has one: one evaluator (metrics logged as
        ``eval/<metric>``) or several by name (``eval/<name>/<metric>``), run one after the
        other."""
        return None

    def flops_per_sample(self) -> float:
        """Training FLOPs per sample, for MFU (0 when unknown)."""
        return 0.0

    def log_values(self, module: nn.Module) -> dict[str, float]:
        """Task-specific values for each log record (called on every rank)."""
        return {}

    def after_optimizer_step(self, module: nn.Module, step: int) -> None:  # noqa: B027
        """Called on every rank after each optimizer step (``step`` counts from 1), e.g. to
        update an EMA of the weights."""

    def state_dict(self) -> dict[str, Any]:
        """This rank's task state that must survive a resume (e.g. EMA weights); saved in the
        rank's checkpoint file, so it may differ between ranks. Tensors and plain containers
        only (the file is read with ``weights_only=True``)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 (optional hook)
        """Restore what :meth:`state_dict` returned (called on resume, before the loop)."""


def stream_epoch_samples(shard_sets: list[ShardSet], override: int | None) -> int | None:
    """Samples in one epoch of a shard mixture: ``override`` if given, else the sets' sizes
    (``None`` when a set's size is unknown)."""
    if override is not None:
        return override
    sizes = [s.num_samples for s in shard_sets]
    return None if None in sizes else sum(sizes)


def move_to_device(value: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """Tensors (also inside lists, tuples and dicts) to ``device``; floating ones to ``dtype``
    when given. Copies are non-blocking: the loader pins its batches on GPU machines."""
    if isinstance(value, torch.Tensor):
        cast = dtype if dtype is not None and value.is_floating_point() else None
        return value.to(device, dtype=cast, non_blocking=True)
    if isinstance(value, dict):
        return {key: move_to_device(item, device, dtype) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(move_to_device(item, device, dtype) for item in value)
    return value


def batch_to_device(batch: Batch, device: torch.device, dtype: torch.dtype | None,
                    input_keys: tuple[str, ...]) -> Batch:
    """A batch on ``device``, the floating tensors under ``input_keys`` cast to ``dtype``."""
    return {key: move_to_device(value, device, dtype if key in input_keys else None)
            for key, value in batch.items()}


@torch.no_grad()
def run_evaluation(evaluator: Evaluator, module: nn.Module,
                   to_device: Callable[[Batch], Batch]) -> dict[str, Any]:
    """One evaluation on this rank; every rank of the job must call it together.

    Under ZeRO-3 each forward gathers parameters collectively, so ranks whose slice ran out
    repeat their last batch (not counted) until every rank is done. Without a process group
    (one process) this is a plain loop. Evaluation draws random numbers (its loader's worker
    seeds), so it runs on forked RNGs: training's random stream, hence its results, do not
    depend on when or how often it evaluates.
    """
    was_training = module.training
    module.eval()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            return _evaluate(evaluator, module, to_device)
    finally:
        module.train(was_training)


def _evaluate(evaluator: Evaluator, module: nn.Module,
              to_device: Callable[[Batch], Batch]) -> dict[str, Any]:
    from pretrain.engine import distributed

    evaluator.reset()
    evaluator.prepare(module)
    batches = iter(evaluator.batches())
    previous: Batch | None = None
    while True:
        batch = next(batches, None)
        if not distributed.any_rank(batch is not None):
            break
        counted = batch is not None
        if batch is None:
            if previous is None:
                raise ValueError(f"rank {distributed.rank()} has no validation sample: the "
                                 "split has fewer samples than there are ranks")
            batch = previous
        previous = batch
        evaluator.update(module, to_device(batch), counted)
    return evaluator.compute()
