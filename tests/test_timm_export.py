"""The timm export: timm alone rebuilds the (config-shrunken) architecture, loads the weights and
reproduces our logits, and its pretrained config carries the evaluation transform."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from pretrain.clip_model import register_variant
from pretrain.encoders.spec import ModelSpec
from pretrain.encoders.timm_export import read_timm_export, write_timm_export

TINY = {"depths": [1, 1, 1, 1], "embed_dims": [16, 32, 48, 64], "num_heads": [1, 1, 1, 2]}
RECIPE_CFG = {"mean": [0.48, 0.45, 0.40], "std": [0.26, 0.26, 0.27], "crop_pct": 1.0,
              "interpolation": "bicubic", "input_size": [3, 48, 48]}


@pytest.fixture()
def exported(tmp_path: Path) -> tuple[torch.nn.Module, ModelSpec, Path]:
    spec = ModelSpec("davit_tiny", TINY, num_classes=5, task="classification")
    torch.manual_seed(3)
    model = spec.build_timm().eval()
    return model, spec, write_timm_export(model.state_dict(), spec, RECIPE_CFG, tmp_path / "out")


def test_timm_alone_rebuilds_the_shrunken_model_and_its_logits(exported, tmp_path: Path) -> None:
    model, _, out = exported
    images = torch.randn(3, 3, 48, 48)
    torch.save(images, tmp_path / "x.pt")
    # a fresh interpreter that imports only timm: no variant registered, no project code
    script = (
        "import sys, torch, timm\n"
        f"m = timm.create_model('local-dir:{out}', pretrained=True).eval()\n"
        f"x = torch.load('{tmp_path / 'x.pt'}', weights_only=True)\n"
        "with torch.no_grad(): torch.save(m(x), sys.argv[1])\n"
        "cfg = timm.data.resolve_data_config({}, model=m)\n"
        "print(cfg['crop_pct'], cfg['interpolation'], list(cfg['mean']),\n"
        "      list(cfg['input_size']))\n")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "y.pt")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    theirs = torch.load(tmp_path / "y.pt", weights_only=True)
    with torch.no_grad():
        ours = model(images)
    assert theirs.shape == (3, 5)
    assert torch.allclose(theirs, ours, atol=1e-5, rtol=0)
    assert result.stdout.split()[:2] == ["1.0", "bicubic"]
    assert "[0.48, 0.45, 0.4]" in result.stdout and "[3, 48, 48]" in result.stdout


def test_pretrained_cfg_overlay_with_the_variant_name(exported) -> None:
    model, spec, out = exported
    variant = register_variant(spec.timm_name, spec.overrides)
    loaded = timm.create_model(variant, pretrained=True, pretrained_cfg_overlay=dict(
        file=str(out / "model.safetensors"), num_classes=spec.num_classes)).eval()
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(loaded(images), model(images), atol=1e-5, rtol=0)


def test_config_names_the_architecture_and_recipe(exported) -> None:
    _, spec, out = exported
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "davit_tiny" and config["num_classes"] == 5
    assert config["model_args"] == TINY and config["num_features"] == 64
    read_spec, cfg = read_timm_export(out)
    assert (read_spec.timm_name, read_spec.overrides, read_spec.num_classes) == (
        "davit_tiny", TINY, 5)
    assert cfg["crop_pct"] == 1.0 and cfg["mean"] == RECIPE_CFG["mean"]
    assert cfg["classifier"] == "head.fc"  # the architecture's defaults fill what we left out
    assert "url" not in cfg and "hf_hub_id" not in cfg


def test_project_encoders_export_too(tmp_path: Path) -> None:
    import pretrain.encoders  # noqa: F401  (registers DWNet with timm)

    spec = ModelSpec("dwnet_tiny", {"depths": [1, 1, 1, 1], "embed_dim": 16}, num_classes=3)
    model = spec.build_timm().eval()
    out = write_timm_export(model.state_dict(), spec, {}, tmp_path / "dw")
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(images), model(images), atol=1e-5, rtol=0)


def test_a_folder_without_config_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="config.json"):
        read_timm_export(tmp_path)

