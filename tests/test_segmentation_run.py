"""Real 2-rank segmentation jobs through launch/finetune.py on synthetic ADE-layout data:
UPerNet learns (mIoU far above the untrained model's, over a validation split that does not
divide between the ranks), --eval-only reproduces the in-training evaluation from the export,
Semantic FPN trains and evaluates, and a kill -9 resumes to identical per-step losses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune.config import FinetuneConfig
from finetune.segmentation.synthetic import write_synthetic_ade
from pretrain.engine.config import load_config
from tests.conftest import run_deepspeed
from tests.jobs import TINY_ENCODER as ENCODER
from tests.jobs import interrupt_and_resume, losses, records

VAL_IMAGES = 13  # 7 for rank 0, 6 for rank 1


@pytest.fixture(scope="module")
def ade(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_ade(tmp_path_factory.mktemp("ade"), train=48, val=VAL_IMAGES,
                               num_classes=4, seed=7, min_side=36, max_side=70)


def _args(run_dir: Path, root: Path, *extra: str, steps: int = 40) -> list[str]:
    return ["--config", "ade20k/demo", "--run-dir", str(run_dir), *ENCODER,
            "--set", f"data.root={root}", "--set", "data.num_classes=4",
            "--set", "data.classes=null", "--set", "data.crop_size=48",
            "--set", "data.scale=[96, 48]", "--set", "data.batch_size=4",
            "--set", "model.decoder_channels=32", "--set", "model.aux_channels=16",
            "--set", f"schedule.steps={steps}", "--set", "schedule.warmup_steps=3",
            "--set", "optimizer.lr=2e-3", "--set", "eval.scale=[96, 48]",
            "--set", "eval.every=20", "--set", "checkpoint.every=10",
            "--set", "log.every=1", "--set", "log.progress=false", *extra]


def _untrained_miou(run_dir: Path) -> float:
    """The mIoU of the run's model at its initialisation (same seed, same evaluator)."""
    from finetune.segmentation.task import SegmentationTask, build_segmentation_module

    cfg = load_config(FinetuneConfig, run_dir / "config.yaml")
    task = SegmentationTask(cfg)
    torch.manual_seed(cfg.train.seed)
    module = build_segmentation_module(cfg, task.spec, None).eval()
    evaluator = task.evaluator(0, 1)
    with torch.no_grad():
        for batch in evaluator.batches():
            evaluator.update(module, batch, counted=True)
    return evaluator.compute()["mIoU"]


@pytest.fixture(scope="module")
def upernet_run(ade: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("upernet") / "run"
    run_deepspeed("finetune.py", _args(run_dir, ade))
    return run_dir


def test_upernet_learns_on_two_ranks(upernet_run: Path) -> None:
    evals = {r["step"]: r for r in records(upernet_run) if "eval/mIoU" in r}
    assert sorted(evals) == [20, 40]
    final = evals[40]
    assert final["eval/images"] == VAL_IMAGES  # every image once, summed over both ranks
    untrained = _untrained_miou(upernet_run)
    assert final["eval/mIoU"] > 0.6 and final["eval/mIoU"] > untrained + 0.4, (
        final["eval/mIoU"], untrained)
    steps = losses(upernet_run)
    assert sum(steps[s] for s in range(37, 41)) < 0.5 * sum(steps[s] for s in range(1, 5))
    last = [r for r in records(upernet_run) if r.get("step") == 40 and "loss" in r][0]
    assert "loss_aux" in last and "loss_decode" in last
    best = json.loads((upernet_run / "eval.json").read_text())["best"]
    assert best["metric"] == "mIoU" and (upernet_run / "checkpoints" / "best").is_file()


def test_eval_only_reproduces_the_final_evaluation(upernet_run: Path, ade: Path,
                                                   tmp_path: Path) -> None:
    export = upernet_run / "export" / "segmenter.pt"
    predictions = tmp_path / "predictions"
    run_deepspeed("finetune.py", _args(
        tmp_path / "eval", ade, "--eval-only", str(export),
        "--set", f"eval.predictions_dir={predictions}", "--set", "eval.overlays=2"))
    results = json.loads((tmp_path / "eval" / "eval.json").read_text())["results"]
    final = json.loads((upernet_run / "eval.json").read_text())["results"]
    assert results["mIoU"] == pytest.approx(final["mIoU"], abs=1e-9)
    assert results["images"] == VAL_IMAGES
    written = sorted(p.stem for p in predictions.glob("*.png"))
    assert len(written) == VAL_IMAGES
    assert len(list((predictions / "overlays").glob("*.jpg"))) == 2
    import numpy as np
    from PIL import Image

    # predictions are in the dataset's label space: classes 1..4, as the annotations
    values = set(np.unique(np.asarray(Image.open(predictions / f"{written[0]}.png"))).tolist())
    assert values and values <= {1, 2, 3, 4}


def test_semantic_fpn_trains_and_evaluates(ade: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "fpn"
    run_deepspeed("finetune.py", _args(run_dir, ade, "--set", "model.kind=semantic_fpn",
                                       "--set", "model.aux_weight=0", "--set",
                                       "model.head_channels=16", "--set", "eval.every=null",
                                       steps=30))
    steps = losses(run_dir)
    assert sum(steps[s] for s in range(27, 31)) < 0.6 * sum(steps[s] for s in range(1, 5))
    final = json.loads((run_dir / "eval.json").read_text())["results"]
    assert final["images"] == VAL_IMAGES
    assert final["mIoU"] > _untrained_miou(run_dir) + 0.3


@pytest.mark.slow
def test_kill_and_resume_repeats_the_losses(upernet_run: Path, ade: Path,
                                            tmp_path: Path) -> None:
    resumed = tmp_path / "resumed"
    interrupt_and_resume("finetune.py", _args(resumed, ade), resumed, after_step=24,
                         how="kill")
    expected, got = losses(upernet_run), losses(resumed)
    assert sorted(got) == list(range(1, 41))
    for step in range(1, 41):
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step
    evals = {r["step"]: r["eval/mIoU"] for r in records(resumed) if "eval/mIoU" in r}
    reference = {r["step"]: r["eval/mIoU"] for r in records(upernet_run) if "eval/mIoU" in r}
    assert evals == reference
