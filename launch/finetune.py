"""Fine-tuning entry point.

    deepspeed --num_gpus 2 launch/finetune.py --config demo_shapes --run-dir runs/demo/finetune

A bare config name resolves under configs/finetune/ (also in its task folders, e.g.
imagenet/davit_tiny). Re-running with the same --run-dir resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.config import ClassificationConfig  # noqa: E402
from pretrain.config import ConfigError, load_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fine-tune a pretrained encoder under DeepSpeed")
    parser.add_argument("--config", required=True, help="YAML path or name under configs/finetune")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config field, e.g. train.steps=100")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="where the run lives (default: runs/finetune/<config name>)")
    parser.add_argument("--check", action="store_true",
                        help="validate the config, print it resolved, and exit")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(ClassificationConfig, args.config, args.overrides, kind="finetune")
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    if args.check:
        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
        return 0
    run_dir = args.run_dir or Path("runs") / "finetune" / Path(args.config).stem

    from finetune.classification.trainer import ClassificationTrainer
    from pretrain.engine import TrainingAborted

    try:
        outcome = ClassificationTrainer(cfg, run_dir).train()
    except TrainingAborted as error:
        print(f"training aborted: {error}", file=sys.stderr)
        return 1
    print(f"fine-tuning {outcome} in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
