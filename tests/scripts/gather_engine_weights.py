"""Test helper, run under the DeepSpeed launcher: rebuild a finished pretraining run's engine
from its latest checkpoint, gather every (possibly ZeRO-3-partitioned) parameter as the live
engine holds it, and save them from rank 0.

    deepspeed --num_gpus 2 tests/scripts/gather_engine_weights.py RUN_DIR OUT.pt
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402
import torch  # noqa: E402

from pretrain.clip_task import ClipTask  # noqa: E402
from pretrain.config import PretrainConfig
from pretrain.engine.config import load_config  # noqa: E402
from pretrain.engine.trainer import Trainer  # noqa: E402


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    run_dir, out = Path(args[0]), Path(args[1])
    cfg = load_config(PretrainConfig, run_dir / "config.yaml")
    trainer = Trainer(cfg, ClipTask(cfg), run_dir)
    module = trainer.engine.module
    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()),
                                           enabled=cfg.deepspeed.zero_stage == 3):
        weights = {name: p.detach().float().clone() for name, p in params.items()}
    trainer.loader.close()
    if trainer.is_main:
        torch.save(weights, out)


if __name__ == "__main__":
    main()
