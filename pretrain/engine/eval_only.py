"""``--eval-only CHECKPOINT``: score a checkpoint on a job's validation split, without training.

One implementation for every task that has the mode (:attr:`Task.eval_only_export`): the task
is set up for the checkpoint (:meth:`Task.for_checkpoint`, before any process group, so a bad
checkpoint is one line), every rank of the launch joins the group with the job's bounded
collective wait, builds the module holding the checkpoint's weights and the evaluator
(:meth:`Task.checkpoint_evaluation`), and scores its slice through :func:`run_evaluation`,
exactly as an evaluation during training does; rank 0 writes ``RUN_DIR/eval.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pretrain.engine import distributed
from pretrain.engine.run_log import write_eval_json
from pretrain.engine.task import Task, batch_to_device, run_evaluation

_COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def evaluation_dtype(task: Task, device: torch.device) -> torch.dtype:
    """The weights' and inputs' dtype: the training precision on GPUs, as the trainer's engine
    holds the weights (a self-autocasting task keeps fp32); fp32 on CPUs."""
    if device.type != "cuda" or task.autocast:
        return torch.float32
    return _COMPUTE_DTYPES.get(task.cfg.deepspeed.precision, torch.float32)


def evaluate_checkpoint(task_class: type[Task], cfg: Any, checkpoint: Path,
                        run_dir: Path) -> dict[str, Any]:
    """Every rank scores its slice of the validation split; returns the reduced metrics."""
    task = task_class.for_checkpoint(cfg, checkpoint)
    task.run_dir = run_dir
    distributed.init_distributed(cfg.deepspeed.backend, cfg.train.collective_timeout)
    module, evaluator = task.checkpoint_evaluation(checkpoint, distributed.rank(),
                                                   distributed.world_size())
    device = distributed.collective_device()
    dtype = evaluation_dtype(task, device)
    module.to(device=device, dtype=dtype)
    results = run_evaluation(
        evaluator, module,
        lambda batch: batch_to_device(batch, device, dtype, task.input_keys))
    if distributed.rank() == 0:
        write_eval_json(run_dir, {"checkpoint": str(checkpoint), "results": results})
    distributed.barrier()
    return results
