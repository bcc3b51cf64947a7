"""Fine-tuning entry point: runs whichever task the config's ``task:`` names.

    deepspeed --num_gpus 2 launch/finetune.py --config demo_shapes --run-dir runs/demo/finetune

A bare config name resolves under configs/finetune/. Re-running with the same --run-dir resumes
from the latest checkpoint. --check validates the config and the inputs it names (shards,
encoder weights) and exits. --eval-only CHECKPOINT evaluates a checkpoint (for segmentation: an
exported segmenter.pt) on the config's validation split instead of training.
"""

from __future__ import annotations

import sys
from pathlib import Path

from finetune.config import FinetuneConfig
from finetune.tasks import check_inputs
from pretrain.engine.config import JobConfig
from pretrain.engine.job_cli import run_job, skip_final_garbage_collection


def make_trainer(cfg: JobConfig, run_dir: Path):  # noqa: ANN201 (imports DeepSpeed late)
    from finetune.tasks import build_task
    from pretrain.engine.trainer import Trainer

    return Trainer(cfg, build_task(cfg), run_dir)


def evaluate_only(cfg: JobConfig, checkpoint: Path, run_dir: Path) -> dict:
    """--eval-only CHECKPOINT: the task class evaluates it (every rank its slice of the split).
    A task class supports it with ``evaluate_checkpoint(cfg, checkpoint, run_dir) -> metrics``;
    the checkpoint holds the weights, so the config's encoder weights are not read."""
    from finetune.tasks import task_class

    task = task_class(cfg)
    if not hasattr(task, "evaluate_checkpoint"):
        raise ValueError(f"task {cfg.task!r} has no evaluation-only mode")
    return task.evaluate_checkpoint(cfg, checkpoint, run_dir)


if __name__ == "__main__":
    code = run_job(None, "Fine-tune a pretrained encoder under DeepSpeed", "finetune",
                   FinetuneConfig, make_trainer, run_root=Path("runs/finetune"),
                   check_inputs=check_inputs, evaluate_only=evaluate_only)
    skip_final_garbage_collection()
    sys.exit(code)
