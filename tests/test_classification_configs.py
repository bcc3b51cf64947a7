"""Every ImageNet recipe validates, states the published figure it targets (checked against
pretrain/published.yaml) and the GPUs it assumes, converts its epochs to steps for that batch,
and builds its model (on the meta device, so DaViT-B and DAT++-B cost nothing)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from finetune.config import FinetuneConfig
from pretrain.encoders.spec import ModelSpec
from pretrain.engine.config import CONFIG_ROOT, ConfigError, load_config
from pretrain.engine.schedule import resolve_schedule
from pretrain.published import published

RECIPES = sorted((CONFIG_ROOT / "finetune" / "imagenet").glob("[!_]*.yaml"))  # _*.yaml: bases
IMAGENET_TRAIN = 1281167
FROM_SCRATCH = ["davit_tiny", "davit_small", "davit_base", "dat_pp_tiny", "dat_pp_small",
                "dat_pp_base", "dwnet_tiny", "dwnet_base", "dynamic_dwnet_tiny",
                "dynamic_dwnet_base"]


def test_every_family_has_its_from_scratch_recipe() -> None:
    names = {path.stem for path in RECIPES}
    assert set(FROM_SCRATCH) <= names
    assert {"dat_pp_base_384", "clip_davit_base", "clip_davit_base_384",
            "linear_probe_clip_davit_base", "eval"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates_states_its_target_and_builds(path: Path) -> None:
    cfg = load_config(FinetuneConfig, path)
    text = path.read_text()
    target = re.search(r"published top-1: ([\d.]+|none) \((\w+)(?: (top1_384))?", text)
    assert target, f"{path.name} states no published top-1"
    if target.group(1) != "none":
        figures = published("classification_imagenet1k")[target.group(2)]
        assert float(target.group(1)) == figures[target.group(3) or "top1"], path.name
    if path.stem in FROM_SCRATCH:
        assert cfg.encoder.weights is None and cfg.encoder.name == path.stem
        assert cfg.schedule.epochs == 300
        assert target.group(2) == path.stem
    recipe = re.search(r"recipe: (\d+) GPUs x (\d+) = batch (\d+)", text)
    if recipe:  # the GPUs assumed, and the schedule in steps on them
        gpus, per_gpu, batch = (int(g) for g in recipe.groups())
        assert per_gpu == cfg.data.batch_size and gpus * per_gpu == batch, path.name
        schedule = resolve_schedule(cfg.schedule, cfg.data.epoch_samples, batch)
        assert cfg.data.epoch_samples == IMAGENET_TRAIN
        per_epoch = math.ceil(IMAGENET_TRAIN / batch)
        assert schedule.total_steps == round(cfg.schedule.epochs * per_epoch)
        assert schedule.warmup_steps == round((cfg.schedule.warmup_epochs or 0) * per_epoch)
        assert cfg.eval.every in (per_epoch - 1, per_epoch, per_epoch + 1), path.name
    else:
        assert path.stem == "eval"
    spec = ModelSpec(cfg.encoder.name, dict(cfg.encoder.overrides), num_classes=1000)
    with torch.device("meta"):
        model = spec.build_timm(drop_path_rate=cfg.encoder.drop_path)
        logits = model(torch.empty(2, 3, cfg.data.image_size, cfg.data.image_size))
    assert logits.shape == (2, 1000)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    expected = published("classification_imagenet1k")[cfg.encoder.name]["params_m"]
    assert params == pytest.approx(expected, rel=0.03), (path.name, params)


def test_ema_under_zero3_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"ema\.enabled: .*zero_stage 0, 1 or 2"):
        load_config(FinetuneConfig, "imagenet/clip_davit_base", ["deepspeed.zero_stage=3"],
                    kind="finetune")


def test_linear_probe_refuses_the_heavy_augmentation() -> None:
    with pytest.raises(ConfigError, match=r"linear_probe: .*data\.randaugment: null"):
        load_config(FinetuneConfig, "imagenet/linear_probe_clip_davit_base",
                    ["data.randaugment=rand-m9-mstd0.5-inc1"], kind="finetune")
    with pytest.raises(ConfigError, match="needs ema.enabled"):
        load_config(FinetuneConfig, "imagenet/davit_tiny", ["eval.best_metric=ema_top1"],
                    kind="finetune")


def test_check_names_a_missing_or_mismatched_image_folder(tmp_path: Path) -> None:
    import subprocess
    import sys

    from data_tools.imagefolder_synthetic import write_synthetic_imagefolder
    from tests.conftest import ROOT

    write_synthetic_imagefolder(tmp_path / "train", 3, per_class=1, seed=0, image_size=16)

    def check(*overrides: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "launch/finetune.py", "--config", "imagenet/davit_tiny",
                   "--check", *(arg for o in overrides for arg in ("--set", o))]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)

    missing = check(f"data.train={tmp_path / 'nope'}")
    assert missing.returncode == 2
    assert f"input error: data.train: no such image folder: {tmp_path / 'nope'}" in missing.stderr
    mismatched = check(f"data.train={tmp_path / 'train'}", f"data.val={tmp_path / 'train'}")
    assert mismatched.returncode == 2
    assert "3 class folders, but data.num_classes is 1000" in mismatched.stderr
    fine = check(f"data.train={tmp_path / 'train'}", f"data.val={tmp_path / 'train'}",
                 "data.num_classes=3")
    assert fine.returncode == 0, fine.stderr[-500:]
    assert "layout: imagefolder" in fine.stdout
