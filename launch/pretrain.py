"""Pretraining entry point.

    deepspeed --num_gpus 2 launch/pretrain.py --config demo.yaml --run-dir runs/demo/pretrain
    deepspeed --hostfile launch/hostfile.example launch/pretrain.py --config giant.yaml

A bare config name resolves under configs/pretrain/. Re-running the same command with the same
--run-dir resumes from the run's latest checkpoint. --check validates the config and exits.
"""

from __future__ import annotations

import sys
from pathlib import Path

from data_tools.mixture import check_samples, load_mixture
from pretrain.config import PretrainConfig
from pretrain.engine.job_cli import run_job, skip_final_garbage_collection


def make_trainer(cfg: PretrainConfig, run_dir: Path):  # noqa: ANN201 (imports DeepSpeed late)
    from pretrain.clip_task import ClipTask
    from pretrain.engine.trainer import Trainer

    return Trainer(cfg, ClipTask(cfg), run_dir)


def check_inputs(cfg: PretrainConfig) -> None:
    # every local shard exists, probed remote ones answer with a tar, and every set has
    # samples (an empty one hangs training)
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
        from pretrain.warm_start import check_warm_start  # builds the model on the meta device

        check_warm_start(cfg.model)


if __name__ == "__main__":
    code = run_job(None, "CLIP pretraining under DeepSpeed", "pretrain", PretrainConfig,
                   make_trainer, check_inputs=check_inputs)
    skip_final_garbage_collection()
    sys.exit(code)
