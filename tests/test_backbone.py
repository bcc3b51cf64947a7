"""finetune/backbone.py: features at strides 4-32 with a LayerNorm per level, for every encoder
family; official mmseg checkpoints (``backbone.*`` with ``norm0..3``) and our exports load all
or nothing. Nothing can be downloaded, so the official files are fabricated from our own models'
state dicts in the official key layout."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from finetune.backbone import Backbone, check_backbone_weights
from pretrain.encoders.spec import SPEC_KEY, ModelSpec
from pretrain.encoders.weights import WeightsMismatchError

SPECS = {
    "davit": ModelSpec("davit_tiny", {"depths": [1, 1, 1, 1], "embed_dims": [16, 32, 48, 64],
                                      "num_heads": [1, 1, 1, 2]}),
    "dat_pp": ModelSpec("dat_pp_tiny", {"dim_stem": 16, "dims": [16, 32, 48, 64],
                                        "attn_types": ["ND", "ND", "ND", "DD"],
                                        "heads": [1, 2, 2, 4], "groups": [1, 1, 1, 2]}),
    "dwnet": ModelSpec("dwnet_tiny", {"embed_dim": 16, "depths": [1, 1, 1, 1]}),
    "dynamic_dwnet": ModelSpec("dynamic_dwnet_tiny", {"embed_dim": 16, "depths": [1, 1, 1, 1]}),
}


def _official_davit_key(key: str) -> str:
    """timm DaViT key -> the official DaViT release's name (the inverse of timm's filter)."""
    key = key.replace("stem.conv", "patch_embeds.0.proj").replace("stem.norm",
                                                                  "patch_embeds.0.norm")
    key = re.sub(r"stages\.(\d+)\.downsample\.conv", r"patch_embeds.\1.proj", key)
    key = re.sub(r"stages\.(\d+)\.downsample\.norm", r"patch_embeds.\1.norm", key)
    key = re.sub(r"stages\.(\d+)\.blocks", r"main_blocks.\1", key)
    return key.replace("cpe1", "cpe.0").replace("cpe2", "cpe.1")


def _randomise_norms(backbone: Backbone) -> None:
    with torch.no_grad():
        for index in backbone.out_indices:
            norm = getattr(backbone, f"norm{index}")
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)


def _official_checkpoint(backbone: Backbone, family: str) -> dict[str, torch.Tensor]:
    """An mmseg-style segmenter state dict whose backbone is ``backbone``."""
    state = {}
    for key, value in backbone.state_dict().items():
        if key.startswith("body."):
            key = key[len("body."):]
            key = _official_davit_key(key) if family == "davit" else key
        state[f"backbone.{key}"] = value.clone()
    state["decode_head.conv_seg.weight"] = torch.zeros(150, 512, 1, 1)  # not the backbone's
    state["auxiliary_head.conv_seg.bias"] = torch.zeros(150)
    return state


@pytest.mark.parametrize("family", SPECS)
def test_features_are_normed_stages_at_strides_4_to_32(family: str) -> None:
    torch.manual_seed(0)
    backbone = Backbone(SPECS[family]).eval()
    assert backbone.strides == [4, 8, 16, 32]
    # not multiples of 32: the stage maps round up, as the encoders pad
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, 64, 96))
    for feature, channels, stride in zip(features, backbone.channels, backbone.strides,
                                         strict=True):
        assert feature.shape == (2, channels, 64 // stride, 96 // stride)
        # a fresh LayerNorm per level: every pixel's channels have mean 0 and variance 1
        assert feature.mean(dim=1).abs().max() < 1e-4
    # the classifier head and final norm are gone: nothing there that would get no gradient
    names = [n for n in backbone.state_dict() if n.startswith("body.")]
    assert not any(re.search(r"(^body\.head\.|norm_pre|cls_norm|^body\.norm\.)", n)
                   for n in names)


@pytest.mark.parametrize("family", SPECS)
def test_official_segmentation_checkpoint_loads_backbone_with_its_norms(
        family: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = Backbone(SPECS[family]).eval()
    _randomise_norms(source)
    path = tmp_path / "upernet_official.pth"
    torch.save({"meta": {"CLASSES": ["wall", "building"]},
                "state_dict": _official_checkpoint(source, family)}, path)
    check_backbone_weights(SPECS[family], path)
    torch.manual_seed(2)
    loaded = Backbone(SPECS[family], path).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for got, expected in zip(loaded(images), source(images), strict=True):
            torch.testing.assert_close(got, expected)


def test_official_checkpoint_without_a_level_norm_is_refused_whole(tmp_path: Path) -> None:
    source = Backbone(SPECS["davit"])
    state = _official_checkpoint(source, "davit")
    del state["backbone.norm2.weight"], state["backbone.norm2.bias"]
    state["backbone.extra.weight"] = torch.zeros(3)
    path = tmp_path / "broken.pth"
    torch.save({"state_dict": state}, path)
    with pytest.raises(WeightsMismatchError) as error:
        check_backbone_weights(SPECS["davit"], path)
    message = str(error.value)
    assert str(path) in message and "nothing was loaded" in message
    assert "norm2.weight" in message and "extra.weight" in message
    with pytest.raises(WeightsMismatchError):
        Backbone(SPECS["davit"], path)


def test_official_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dwnet.pth"
    torch.save({"state_dict": _official_checkpoint(Backbone(SPECS["dwnet"]), "dwnet")}, path)
    with pytest.raises(WeightsMismatchError, match="shape mismatches|missing keys"):
        Backbone(SPECS["dat_pp"], path)


def test_our_encoder_export_loads_the_trunk_and_norms_start_fresh(tmp_path: Path) -> None:
    spec = SPECS["davit"]
    torch.manual_seed(3)
    encoder = spec.build_timm()
    path = tmp_path / "encoder.pt"
    torch.save({"state_dict": encoder.state_dict(), SPEC_KEY: spec.to_dict()}, path)
    check_backbone_weights(spec, path)
    backbone = Backbone(spec, path).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        raw = encoder.eval().forward_intermediates(images, intermediates_only=True)
        for got, stage in zip(backbone(images), raw, strict=True):
            expected = torch.nn.functional.layer_norm(stage.permute(0, 2, 3, 1),
                                                      stage.shape[1:2], eps=1e-5)
            torch.testing.assert_close(got, expected.permute(0, 3, 1, 2))
    # the export of another architecture fails before anything loads
    other = tmp_path / "other.pt"
    torch.save({"state_dict": SPECS["dwnet"].build_timm().state_dict()}, other)
    with pytest.raises(WeightsMismatchError):
        check_backbone_weights(spec, other)
