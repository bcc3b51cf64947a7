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

# Python puts this script's folder first on sys.path, and this file, named like the package it
# runs, would shadow that package: take the folder off (the packages come from the install).
if sys.path and Path(sys.path[0]) == Path(__file__).resolve().parent:
    del sys.path[0]

from finetune.config import FinetuneConfig  # noqa: E402
from finetune.registry import task_class  # noqa: E402
from pretrain.engine.job_cli import run_job, skip_final_garbage_collection  # noqa: E402

if __name__ == "__main__":
    code = run_job(None, "Fine-tune a pretrained encoder under DeepSpeed", "finetune",
                   FinetuneConfig, task_class, run_root=Path("runs/finetune"))
    skip_final_garbage_collection()
    sys.exit(code)
