"""Zero-shot classification and retrieval of an exported CLIP model: the evaluations a
pretraining run configures under ``eval:``, run on its export in one process.

    python -m pretrain.evaluate --export runs/demo/pretrain/export/clip.pt   # the run's evals
    python -m pretrain.evaluate --export clip.pt --zero-shot /data/imagenet/val
    python -m pretrain.evaluate --export clip.pt --retrieval "/data/coco_val/{00000..00004}.tar"

With neither ``--zero-shot`` nor ``--retrieval``, the evaluations of the run's own config (the
``config.yaml`` next to the export's folder) run. ``--zero-shot`` takes an ImageFolder (ImageNet
val in wnid folders gets open_clip's class names and OpenAI's templates by default) or labelled
shards with ``--label-key``; ``--classes`` / ``--templates`` take ``imagenet`` / ``openai``,
``folders`` (the folder names) or a text file with one entry per line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from pretrain.clip_eval import clip_evaluators
from pretrain.clip_model import build_tokenizer
from pretrain.config import PretrainEvalConfig, RetrievalEval, ZeroShotEval
from pretrain.data import eval_transform
from pretrain.engine.task import run_evaluation
from pretrain.engine.threads import apply_thread_policy
from pretrain.export import load_exported_clip


class _ClipHolder(nn.Module):
    """What the evaluators call: a module with a ``clip`` attribute (as the trainer's is)."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip


def evaluate_export(export: str | Path, zero_shot: list[ZeroShotEval],
                    retrieval: list[RetrievalEval], batch_size: int = 64, workers: int = 0
                    ) -> dict[str, Any]:
    """Metrics ``<name>/<metric>`` of the export (``clip.pt``) on the given evaluations."""
    clip, model_cfg = load_exported_clip(export)
    evaluators = clip_evaluators(zero_shot, retrieval, eval_transform(model_cfg.image.image_size),
                                 build_tokenizer(model_cfg.text.context_length), batch_size,
                                 workers, rank=0, world_size=1)
    module = _ClipHolder(clip)
    return {f"{name}/{metric}": value for name, evaluator in evaluators.items()
            for metric, value in run_evaluation(evaluator, module, lambda batch: batch).items()}


def zero_shot_accuracy(export: str | Path, shards: str,
                       prompts: dict[str, tuple[list[str], list[str]]],
                       limit: int | None = None) -> dict[str, float]:
    """Top-1 of the export on labelled shards for each label field of ``prompts`` (field ->
    (class names, templates)): ``{"zero_shot_top1_<field>": ...}`` (what the demo reports)."""
    specs = [ZeroShotEval(name=field, images=shards, label_key=field, classes=names,
                          templates=templates, limit=limit)
             for field, (names, templates) in prompts.items()]
    results = evaluate_export(export, specs, [])
    summary = {f"zero_shot_top1_{field}": results[f"{field}/top1"] for field in prompts}
    summary["zero_shot_samples"] = next(results[f"{f}/samples"] for f in prompts)
    return summary


def _run_evaluations(export: Path) -> PretrainEvalConfig:
    config = export.parent.parent / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{config}: no run config next to the export; name the "
                                "evaluations with --zero-shot / --retrieval")
    return PretrainEvalConfig.model_validate(yaml.safe_load(config.read_text()).get("eval", {}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", required=True, type=Path, help="clip.pt of an export")
    parser.add_argument("--zero-shot", default=None, help="ImageFolder root or labelled shards")
    parser.add_argument("--label-key", default=None, help="shards: the class field of .json")
    parser.add_argument("--classes", default="imagenet")
    parser.add_argument("--templates", default="openai")
    parser.add_argument("--retrieval", default=None, help="image-caption shards")
    parser.add_argument("--limit", type=int, default=None, help="at most this many images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        apply_thread_policy(log=sys.stderr)  # standard output is the results' JSON
        if args.zero_shot is None and args.retrieval is None:
            evals = _run_evaluations(args.export)
            zero_shot, retrieval = evals.zero_shot, evals.retrieval
        else:
            zero_shot = [ZeroShotEval(name="zero_shot", images=args.zero_shot,
                                      label_key=args.label_key, classes=args.classes,
                                      templates=args.templates, limit=args.limit)
                         ] if args.zero_shot else []
            retrieval = [RetrievalEval(name="retrieval", shards=args.retrieval,
                                       limit=args.limit)] if args.retrieval else []
        if not zero_shot and not retrieval:
            raise ValueError("nothing to evaluate: the run's config has no eval.zero_shot or "
                             "eval.retrieval; give --zero-shot or --retrieval")
        results = evaluate_export(args.export, zero_shot, retrieval, args.batch_size,
                                  args.workers)
    except (FileNotFoundError, ValueError) as error:
        print(f"evaluate: {error}", flush=True)
        return 2
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
