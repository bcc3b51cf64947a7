"""Real 2-rank detection jobs through launch/finetune.py on a generated COCO (real json + JPEGs):
Mask R-CNN learns (box and mask AP, computed by COCOeval from the written results JSON, far
above the untrained model's), --eval-only reproduces the in-training evaluation from the
export, RetinaNet and Cascade Mask R-CNN train and evaluate (the cascade under bf16 autocast),
every ZeRO stage trains, and a kill -9 resumes to identical per-step losses.

Each job costs a minute or two on 2 CPU cores, so they run with ``make test-slow``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_tools.coco_synthetic import write_synthetic_coco
from finetune.config import FinetuneConfig
from pretrain.engine.config import load_config
from tests.conftest import run_deepspeed
from tests.jobs import TINY_ENCODER as ENCODER
from tests.jobs import interrupt_and_resume, losses, records

pytestmark = pytest.mark.slow

VAL_IMAGES = 13  # 7 for rank 0, 6 for rank 1


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_coco(tmp_path_factory.mktemp("coco"), train_images=48,
                                val_images=VAL_IMAGES, seed=3, min_size=80, max_size=128)


def _args(run_dir: Path, root: Path, *extra: str, steps: int = 60) -> list[str]:
    return ["--config", "coco/demo", "--run-dir", str(run_dir), *ENCODER,
            "--set", f"data.root={root}", "--set", "data.scales=[96, 112, 128]",
            "--set", "data.max_size=192", "--set", "eval.min_size=112",
            "--set", "eval.max_size=192", "--set", "model.fpn_channels=32",
            "--set", "model.head_channels=32", "--set", "model.fc_channels=128",
            "--set", f"schedule.steps={steps}", "--set", "schedule.warmup_steps=5",
            "--set", f"schedule.milestones=[{steps + 1}]", "--set", "optimizer.lr=1e-3",
            "--set", f"eval.every={steps // 2}", "--set", "checkpoint.every=10",
            "--set", "log.every=1", "--set", "log.progress=false", *extra]


def _untrained(run_dir: Path) -> dict[str, float]:
    """COCOeval of the run's model at its initialisation (same seed, same evaluator)."""
    from finetune.detection.task import DetectionTask, build_detection_module

    cfg = load_config(FinetuneConfig, run_dir / "config.yaml")
    task = DetectionTask(cfg)
    torch.manual_seed(cfg.train.seed)
    module = build_detection_module(cfg, task.spec, None, task.num_classes).eval()
    evaluator = task.evaluator(0, 1)
    with torch.no_grad():
        for batch in evaluator.batches():
            evaluator.update(module, batch, counted=True)
    return evaluator.compute()


@pytest.fixture(scope="module")
def mask_rcnn_run(coco: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("mask_rcnn") / "run"
    run_deepspeed("finetune.py", _args(run_dir, coco))
    return run_dir


def test_mask_rcnn_learns_on_two_ranks(mask_rcnn_run: Path, coco: Path) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    evals = {r["step"]: r for r in records(mask_rcnn_run) if "eval/bbox/AP" in r}
    assert sorted(evals) == [30, 60]
    final = json.loads((mask_rcnn_run / "eval.json").read_text())["results"]
    assert final["images"] == VAL_IMAGES  # every image once, summed over both ranks
    untrained = _untrained(mask_rcnn_run)
    for metric in ("bbox/AP", "segm/AP"):
        assert final[metric] > 0.3 and final[metric] > untrained[metric] + 0.25, (
            metric, final[metric], untrained[metric])
    # the figures are COCOeval's on the written results JSON, against the original json
    ground_truth = COCO(str(coco / "annotations" / "instances_val2017.json"))
    detections = ground_truth.loadRes(str(mask_rcnn_run / "detections.json"))
    for iou_type in ("bbox", "segm"):
        scorer = COCOeval(ground_truth, detections, iou_type)
        scorer.evaluate()
        scorer.accumulate()
        scorer.summarize()
        assert scorer.stats[0] == pytest.approx(final[f"{iou_type}/AP"], abs=1e-9)
    steps = losses(mask_rcnn_run)
    assert sum(steps[s] for s in range(57, 61)) < 0.5 * sum(steps[s] for s in range(1, 5))
    last = [r for r in records(mask_rcnn_run) if r.get("step") == 60 and "loss" in r][0]
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness"} <= set(last)
    best = json.loads((mask_rcnn_run / "eval.json").read_text())["best"]
    assert best["metric"] == "bbox/AP" and (mask_rcnn_run / "checkpoints" / "best").is_file()


def test_eval_only_reproduces_the_final_evaluation(mask_rcnn_run: Path, coco: Path,
                                                   tmp_path: Path) -> None:
    export = mask_rcnn_run / "export" / "detector.pt"
    run_deepspeed("finetune.py", _args(tmp_path / "eval", coco, "--eval-only", str(export)))
    results = json.loads((tmp_path / "eval" / "eval.json").read_text())["results"]
    final = json.loads((mask_rcnn_run / "eval.json").read_text())["results"]
    for metric in ("bbox/AP", "segm/AP", "bbox/AR100"):
        assert results[metric] == pytest.approx(final[metric], abs=1e-9)
    assert (tmp_path / "eval" / "detections.json").is_file()


# RetinaNet's smallest anchors (32 px at P3) need the objects at twice the scale
RETINANET = ["--set", "data.scales=[224, 256]", "--set", "data.max_size=384",
             "--set", "eval.min_size=256", "--set", "eval.max_size=384",
             "--set", "optimizer.grad_clip=10"]


@pytest.mark.parametrize(("kind", "extra", "steps"), [
    ("retinanet", RETINANET, 30),
    ("cascade_mask_rcnn", ["--set", "deepspeed.precision=bf16"], 30),
])
def test_other_detectors_train_and_evaluate(kind: str, extra: list[str], steps: int,
                                            coco: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / kind
    run_deepspeed("finetune.py", _args(run_dir, coco, "--set", f"model.kind={kind}", *extra,
                                       "--set", "checkpoint.every=1000", steps=steps))
    losses_at = losses(run_dir)
    first = sum(losses_at[s] for s in range(1, 5))
    assert sum(losses_at[s] for s in range(steps - 3, steps + 1)) < 0.75 * first
    final = json.loads((run_dir / "eval.json").read_text())["results"]
    assert final["images"] == VAL_IMAGES
    assert final["bbox/AP"] > 0.02 and final["bbox/AR100"] > 0.15, final
    assert ("segm/AP" in final) == (kind != "retinanet")
    if kind == "cascade_mask_rcnn":
        last = [r for r in records(run_dir) if r.get("step") == steps and "loss" in r][0]
        assert {"loss_box_s0", "loss_box_s2", "loss_mask_s2"} <= set(last)
        # bf16 autocast keeps fp32 weights: DeepSpeed's config has no bf16 section
        assert "bf16" not in json.loads((run_dir / "deepspeed.json").read_text())


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_kill_and_resume_repeats_the_losses(stage: int, mask_rcnn_run: Path, coco: Path,
                                            tmp_path: Path) -> None:
    """ZeRO-1 repeats the first 24 steps of the 60-step run (step decay after the end and the
    same warmup: the same learning rates); ZeRO-2 / 3 each repeat their own uninterrupted run
    (their reductions run in another order than ZeRO-1's)."""
    args = lambda run: _args(run, coco, "--set", f"deepspeed.zero_stage={stage}",  # noqa: E731
                             "--set", "eval.every=null", steps=24)
    if stage == 1:
        reference = {s: v for s, v in losses(mask_rcnn_run).items() if s <= 24}
    else:
        run_deepspeed("finetune.py", args(tmp_path / "reference"))
        reference = losses(tmp_path / "reference")
    resumed = tmp_path / "resumed"
    interrupt_and_resume("finetune.py", args(resumed), resumed, after_step=14, how="kill")
    got = losses(resumed)
    assert sorted(got) == list(range(1, 25))
    for step in range(1, 25):
        assert got[step] == pytest.approx(reference[step], rel=1e-6), step
