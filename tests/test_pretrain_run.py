"""A real 2-rank DeepSpeed pretraining run: the loss falls, checkpoints and exports are usable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from data_tools.synthetic import COLORS
from pretrain.metrics import read_metrics
from tests.conftest import TINY_MODEL, run_deepspeed


@pytest.fixture(scope="module")
def pretrain_run(shape_shards: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    run_deepspeed("pretrain.py", [
        "--config", "demo", "--run-dir", str(run_dir), *TINY_MODEL,
        "--set", f"data.train={shape_shards['train']}",
        "--set", "data.batch_size=16", "--set", "data.workers=1",
        "--set", "data.shuffle_buffer=64", "--set", "data.shuffle_initial=16",
        "--set", "train.steps=24", "--set", "train.warmup_steps=3", "--set", "train.lr=3e-3",
        "--set", "log.every=1", "--set", "checkpoint.every=12", "--set", "checkpoint.keep=1",
    ])
    return run_dir


def test_loss_falls_and_metrics_are_complete(pretrain_run: Path) -> None:
    records = read_metrics(pretrain_run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 25))
    first = sum(r["loss"] for r in records[:4]) / 4
    last = sum(r["loss"] for r in records[-4:]) / 4
    assert last < first - 0.3, (first, last)
    for key in ("samples_seen", "lr", "samples_per_s", "data_wait_fraction", "peak_memory_gb",
                "skipped_samples"):
        assert key in records[-1]
    assert records[-1]["samples_seen"] == 24 * 16 * 2  # steps x micro-batch x ranks
    assert records[-1]["skipped_samples"] == 0


def test_run_directory_holds_config_and_checkpoints(pretrain_run: Path) -> None:
    assert (pretrain_run / "config.yaml").is_file()
    ds = json.loads((pretrain_run / "deepspeed.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 32
    checkpoints = pretrain_run / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000024"
    # keep=1: the step-12 checkpoint was pruned once step 24 was complete
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000024"]
    assert (checkpoints / "step_00000024" / "rank_00001.pt").is_file()


def test_exported_encoder_reloads_with_identical_outputs(pretrain_run: Path) -> None:
    from pretrain.export import load_exported_clip
    from pretrain.models.weights import load_encoder_weights

    payload = torch.load(pretrain_run / "export" / "encoder.pt", weights_only=True)
    spec = payload["encoder"]
    assert spec["timm_name"] == "davit_tiny"
    encoder = timm.create_model(spec["timm_name"], num_classes=0, **spec["overrides"]).eval()
    load_encoder_weights(encoder, pretrain_run / "export" / "encoder.pt")
    clip, _ = load_exported_clip(pretrain_run / "export" / "clip.pt")
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(encoder(images), clip.visual.trunk(images))
    # the export holds the trained weights, not the initialisation
    fresh = timm.create_model(spec["timm_name"], num_classes=0, **spec["overrides"])
    trained = encoder.state_dict()
    assert any(not torch.equal(v, trained[k]) for k, v in fresh.state_dict().items())


def test_finetune_from_export(pretrain_run: Path, shape_shards: dict[str, str],
                              tmp_path: Path) -> None:
    """The fine-tuning path end to end on the colour labels (which a few steps can learn; the
    demo fine-tunes on shapes, which take longer)."""
    run_dir = tmp_path / "finetune"
    colors = "[" + ", ".join(COLORS) + "]"
    run_deepspeed("finetune.py", [
        "--config", "demo_shapes", "--run-dir", str(run_dir),
        "--set", f"encoder.weights={pretrain_run / 'export' / 'encoder.pt'}",
        "--set", f"data.train={shape_shards['labelled']}",
        "--set", f"data.val={shape_shards['heldout']}",
        "--set", "data.label_key=color", "--set", f"data.classes={colors}",
        "--set", "data.num_classes=8",
        "--set", "data.image_size=32", "--set", "data.batch_size=16",
        "--set", "data.shuffle_buffer=64", "--set", "data.shuffle_initial=16",
        "--set", "train.steps=30", "--set", "train.warmup_steps=3", "--set", "train.lr=2e-3",
        "--set", "log.every=1",
    ])
    records = read_metrics(run_dir / "metrics.jsonl")
    assert len(records) == 30
    first = sum(r["loss"] for r in records[:5]) / 5
    last = sum(r["loss"] for r in records[-5:]) / 5
    assert last < first - 0.3, (first, last)
    result = json.loads((run_dir / "export" / "eval.json").read_text())
    assert result["samples"] == 192
    assert result["top1"] > 0.4  # chance is 1/8
    # the exported classifier reloads strictly and reproduces the reported accuracy
    from finetune.classification.evaluate import evaluate_top1
    from finetune.config import ClassificationConfig
    from pretrain.config import load_config

    payload = torch.load(run_dir / "export" / "classifier.pt", weights_only=True)
    spec = payload["encoder"]
    classifier = timm.create_model(spec["timm_name"], num_classes=spec["num_classes"],
                                   **spec["overrides"])
    classifier.load_state_dict(payload["state_dict"], strict=True)
    cfg = load_config(ClassificationConfig, run_dir / "config.yaml")
    assert evaluate_top1(classifier, cfg.data) == result


def test_zero_shot_evaluation_of_the_export(pretrain_run: Path, shape_shards: dict) -> None:
    from pretrain.evaluate import evaluate_synthetic

    result = evaluate_synthetic(str(pretrain_run / "export" / "clip.pt"), shape_shards["heldout"])
    assert result["zero_shot_samples"] == 192
    assert 0.0 <= result["zero_shot_top1_color"] <= 1.0
    assert 0.0 <= result["zero_shot_top1_shape"] <= 1.0
