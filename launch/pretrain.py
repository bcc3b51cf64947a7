"""Pretraining entry point.

    deepspeed --num_gpus 2 launch/pretrain.py --config demo.yaml --run-dir runs/demo/pretrain
    deepspeed --hostfile launch/hostfile.example launch/pretrain.py --config giant.yaml

A bare config name resolves under configs/pretrain/. Re-running the same command with the same
--run-dir resumes from the run's latest checkpoint. --check validates the config and exits.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Python puts this script's folder first on sys.path, and this file, named like the package it
# runs, would shadow that package: take the folder off (the packages come from the install).
if sys.path and Path(sys.path[0]) == Path(__file__).resolve().parent:
    del sys.path[0]

from pretrain.config import PretrainConfig  # noqa: E402
from pretrain.engine.job_cli import run_job, skip_final_garbage_collection  # noqa: E402


def clip_task(cfg: PretrainConfig):  # noqa: ANN201 (imports the task, and DeepSpeed, late)
    from pretrain.clip_task import ClipTask

    return ClipTask


if __name__ == "__main__":
    code = run_job(None, "CLIP pretraining under DeepSpeed", "pretrain", PretrainConfig,
                   clip_task)
    skip_final_garbage_collection()
    sys.exit(code)
