"""Pretraining entry point.

    deepspeed --num_gpus 2 launch/pretrain.py --config demo.yaml --run-dir runs/demo/pretrain
    deepspeed --hostfile launch/hostfile.example launch/pretrain.py --config giant.yaml

A bare config name resolves under configs/pretrain/. Re-running the same command with the same
--run-dir resumes from the run's latest checkpoint. --check validates the config and exits.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_tools.mixture import check_samples, load_mixture  # noqa: E402
from pretrain.config import PretrainConfig  # noqa: E402
from pretrain.job_cli import run_job, skip_final_garbage_collection  # noqa: E402


def make_trainer(cfg: PretrainConfig, run_dir: Path):  # noqa: ANN201 (imports DeepSpeed late)
    from pretrain.clip_task import ClipTask
    from pretrain.engine import Trainer

    return Trainer(cfg, ClipTask(cfg), run_dir)


def check_inputs(cfg: PretrainConfig) -> None:
    # every shard of every set exists, and every set has samples (an empty one hangs training)
    check_samples(load_mixture(cfg.data.mixture_spec))
    init = cfg.model.init_from
    if init.clip is not None or init.image is not None:
        from pretrain.warm_start import check_warm_start  # builds the model on the meta device

        check_warm_start(cfg.model)


if __name__ == "__main__":
    code = run_job(None, "CLIP pretraining under DeepSpeed", "pretrain", PretrainConfig,
                   make_trainer, check_inputs=check_inputs)
    skip_final_garbage_collection()
    sys.exit(code)
