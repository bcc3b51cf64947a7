"""Fine-tuning entry point.

    deepspeed --num_gpus 2 launch/finetune.py --config demo_shapes --run-dir runs/demo/finetune

A bare config name resolves under configs/finetune/. Re-running with the same --run-dir resumes
from the latest checkpoint. --check validates the config and exits.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_tools.mixture import load_mixture, shard_set  # noqa: E402
from finetune.config import ClassificationConfig  # noqa: E402
from pretrain.job_cli import run_job  # noqa: E402


def make_trainer(cfg: ClassificationConfig, run_dir: Path):  # noqa: ANN201
    from finetune.classification.trainer import ClassificationTrainer

    return ClassificationTrainer(cfg, run_dir)


def check_inputs(cfg: ClassificationConfig) -> None:
    load_mixture(cfg.data.train)
    shard_set(cfg.data.val)
    weights = cfg.encoder.weights
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"encoder.weights: no such file {weights}")


if __name__ == "__main__":
    sys.exit(run_job(None, "Fine-tune a pretrained encoder under DeepSpeed", "finetune",
                     ClassificationConfig, make_trainer, run_root=Path("runs/finetune"),
                     check_inputs=check_inputs))
