"""Pretraining entry point.

    deepspeed --num_gpus 2 launch/pretrain.py --config demo.yaml --run-dir runs/demo/pretrain
    deepspeed --hostfile launch/hostfile.example launch/pretrain.py --config giant.yaml

A bare config name resolves under configs/pretrain/. Re-running the same command with the same
--run-dir resumes from the run's latest checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.config import ConfigError, PretrainConfig, load_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="CLIP pretraining under DeepSpeed")
    parser.add_argument("--config", required=True, help="YAML path or name under configs/pretrain")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config field, e.g. train.steps=100")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="where the run lives (default: runs/<config name>)")
    parser.add_argument("--check", action="store_true",
                        help="validate the config, print it resolved, and exit")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(PretrainConfig, args.config, args.overrides, kind="pretrain")
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    if args.check:
        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
        return 0
    run_dir = args.run_dir or Path("runs") / Path(args.config).stem

    from pretrain.clip_trainer import ClipTrainer
    from pretrain.engine import TrainingAborted

    try:
        outcome = ClipTrainer(cfg, run_dir).train()
    except TrainingAborted as error:
        print(f"training aborted: {error}", file=sys.stderr)
        return 1
    print(f"pretraining {outcome} in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
