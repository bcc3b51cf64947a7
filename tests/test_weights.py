"""The encoder weight loader: every origin loads strictly and reproduces outputs; bad files fail
loudly and load nothing."""

from __future__ import annotations

import argparse
import pickle
import re
import sys
import types
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from pretrain.encoders.weights import (
    WeightsMismatchError,
    load_encoder_weights,
    read_state_dict,
)

IMAGES = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a 2-core machine shared with other jobs this is much faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomised(name: str, **kwargs) -> torch.nn.Module:
    """A model whose every tensor (norms and BN statistics too) differs from a fresh build."""
    torch.manual_seed(1)
    model = timm.create_model(name, **kwargs).eval()
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if tensor.is_floating_point():  # small nudges; variances stay positive
                shift = 0.0 if key.endswith("running_var") else 0.5
                tensor.add_((torch.rand_like(tensor) - shift) * 0.02)
    return model


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IMAGES)


@pytest.fixture(scope="module")
def sources() -> dict[str, torch.nn.Module]:
    names = ["dat_pp_tiny", "dwnet_tiny", "dynamic_dwnet_tiny", "davit_tiny"]
    return {name: _randomised(name) for name in names}


def _fake_yacs(monkeypatch) -> type:
    """A stand-in for yacs' CfgNode importable as ``yacs.config.CfgNode``, to write the kind of
    ``'config'`` entry that Swin-derived training code (DAT++, DWNet) stores."""

    class CfgNode(dict):
        def __init__(self, *args):
            super().__init__(*args)
            self.__dict__["__immutable__"] = False

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    package, module = types.ModuleType("yacs"), types.ModuleType("yacs.config")
    module.CfgNode, package.config = CfgNode, module
    monkeypatch.setitem(sys.modules, "yacs", package)
    monkeypatch.setitem(sys.modules, "yacs.config", module)
    return CfgNode


@pytest.mark.parametrize(
    ("name", "origin"),
    [
        ("dat_pp_tiny", "dat_pp"),
        ("dwnet_tiny", "dwnet-static"),
        ("dynamic_dwnet_tiny", "dwnet-dynamic"),
    ],
)
def test_official_training_checkpoint_loads_strictly(sources, name, origin, tmp_path, monkeypatch):
    cfg_node = _fake_yacs(monkeypatch)
    path = tmp_path / "official.pth"
    torch.save(
        {
            "model": sources[name].state_dict(),
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
            "epoch": 299,
            "max_accuracy": 83.9,
            "config": cfg_node({"MODEL": cfg_node({"TYPE": "dat", "DROP_PATH_RATE": 0.2})}),
            "args": argparse.Namespace(cfg="configs/dat_tiny.yaml", local_rank=0),
        },
        path,
    )
    model = timm.create_model(name)
    assert load_encoder_weights(model, path) == origin
    torch.testing.assert_close(_outputs(model), _outputs(sources[name]), rtol=0, atol=0)


def _to_official_davit_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of timm's DaViT conversion: the key names of the official DaViT code."""
    out = {}
    for key, value in state_dict.items():
        key = key.replace("stem.", "stages.0.downsample.")
        key = re.sub(r"stages\.(\d+)\.downsample\.conv", r"patch_embeds.\1.proj", key)
        key = re.sub(r"stages\.(\d+)\.downsample\.", r"patch_embeds.\1.", key)
        key = re.sub(r"stages\.(\d+)\.blocks", r"main_blocks.\1", key)
        key = key.replace("cpe1", "cpe.0").replace("cpe2", "cpe.1")
        key = key.replace("head.norm.", "norms.").replace("head.fc.", "head.")
        out[key] = value
    return out


def test_official_davit_checkpoint_is_converted(sources, tmp_path):
    official = _to_official_davit_keys(sources["davit_tiny"].state_dict())
    assert "main_blocks.2.2.0.cpe.0.proj.weight" in official  # really the official layout
    path = tmp_path / "davit_tiny_official.pth.tar"
    torch.save({"state_dict": official, "args": argparse.Namespace(model="DaViT_tiny")}, path)
    model = timm.create_model("davit_tiny")
    assert load_encoder_weights(model, path) == "davit-official"
    torch.testing.assert_close(_outputs(model), _outputs(sources["davit_tiny"]), rtol=0, atol=0)


@pytest.mark.parametrize("container", ["bare", "state_dict", "module", "ddp", "safetensors"])
@pytest.mark.parametrize("name", ["dat_pp_tiny", "dwnet_tiny", "davit_tiny"])
def test_project_and_timm_files_round_trip(sources, name, container, tmp_path):
    state = sources[name].state_dict()
    path = tmp_path / ("w.safetensors" if container == "safetensors" else "w.pt")
    if container == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    elif container == "ddp":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    else:
        payload = {container: state, "encoder": {"timm_name": name}}
        torch.save(state if container == "bare" else payload, path)
    model = timm.create_model(name)
    load_encoder_weights(model, path)
    torch.testing.assert_close(_outputs(model), _outputs(sources[name]), rtol=0, atol=0)


def test_explicit_key_selects_the_ema_weights(sources, tmp_path):
    path = tmp_path / "timm_train.pth.tar"
    ema = sources["dwnet_tiny"].state_dict()
    raw = {k: torch.zeros_like(v) for k, v in ema.items()}
    torch.save({"state_dict": raw, "state_dict_ema": ema}, path)
    assert all(t.count_nonzero() == 0 for t in read_state_dict(path).values())
    model = timm.create_model("dwnet_tiny")
    load_encoder_weights(model, path, key="state_dict_ema")
    torch.testing.assert_close(_outputs(model), _outputs(sources["dwnet_tiny"]), rtol=0, atol=0)


def test_wrong_family_raises_listing_keys_and_loads_nothing(sources, tmp_path):
    path = tmp_path / "dwnet.pth"
    torch.save({"model": sources["dwnet_tiny"].state_dict()}, path)
    model = timm.create_model("dat_pp_tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsMismatchError) as error:
        load_encoder_weights(model, path)
    message = str(error.value)
    assert "origin: dwnet-static" in message and "dat_pp_tiny" in message
    assert "missing keys (" in message and "patch_proj.0.weight" in message
    assert "unexpected keys (" in message and "patch_embed.proj.weight" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_static_dwnet_checkpoint_into_dynamic_model_is_refused(sources, tmp_path):
    path = tmp_path / "static.pth"
    torch.save({"model": sources["dwnet_tiny"].state_dict()}, path)
    with pytest.raises(WeightsMismatchError, match=r"attn2conv\.conv\.conv1\.weight"):
        load_encoder_weights(timm.create_model("dynamic_dwnet_tiny"), path)


def test_classifier_shape_mismatch_is_listed_and_skippable(sources, tmp_path):
    path = tmp_path / "in1k.pth"
    torch.save({"model": sources["dat_pp_tiny"].state_dict()}, path)
    model = timm.create_model("dat_pp_tiny", num_classes=10)
    with pytest.raises(WeightsMismatchError) as error:
        load_encoder_weights(model, path)
    message = str(error.value)
    assert "cls_head.weight: checkpoint (1000, 512) vs model (10, 512)" in message
    assert "skip_classifier=True" in message
    head = model.cls_head.weight.clone()
    load_encoder_weights(model, path, skip_classifier=True)
    assert torch.equal(model.cls_head.weight, head)  # the new head stays as initialised
    with torch.no_grad():
        ours = model.eval().forward_features(IMAGES)
        theirs = sources["dat_pp_tiny"].forward_features(IMAGES)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_headless_trunk_needs_skip_classifier(sources, tmp_path):
    path = tmp_path / "in1k.pth"
    torch.save(sources["dwnet_tiny"].state_dict(), path)
    trunk = timm.create_model("dwnet_tiny", num_classes=0)
    with pytest.raises(WeightsMismatchError, match=r"unexpected keys \(2\)"):
        load_encoder_weights(trunk, path)
    load_encoder_weights(trunk, path, skip_classifier=True)
    with torch.no_grad():
        pooled = sources["dwnet_tiny"].forward_head(
            sources["dwnet_tiny"].forward_features(IMAGES), pre_logits=True
        )
    torch.testing.assert_close(_outputs(trunk), pooled, rtol=0, atol=0)


def test_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": Payload()}, path)
    with pytest.raises(pickle.UnpicklingError, match="Refusing to execute"):
        read_state_dict(path)
    assert not marker.exists()


def test_file_without_state_dict_is_refused(tmp_path):
    path = tmp_path / "not_weights.pt"
    torch.save({"epoch": 3, "optimizer": {"state": {}}}, path)
    with pytest.raises(ValueError, match="holds no state dict"):
        read_state_dict(path)


def test_feature_wrappers_are_refused_with_guidance(tmp_path):
    features = timm.create_model("dwnet_tiny", features_only=True)
    with pytest.raises(TypeError, match="forward_intermediates"):
        load_encoder_weights(features, tmp_path / "unused.pt")


def test_timm_pretrained_route_accepts_official_files_for_features(sources, tmp_path):
    path = tmp_path / "dat_official.pth"
    torch.save({"model": sources["dat_pp_tiny"].state_dict()}, path)
    features = timm.create_model(
        "dat_pp_tiny", pretrained=True, features_only=True, pretrained_cfg_overlay=dict(file=path)
    ).eval()
    with torch.no_grad():
        ours = features(IMAGES)
        theirs = sources["dat_pp_tiny"].forward_intermediates(IMAGES, intermediates_only=True)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dat_checkpoint_resamples_position_tables_for_another_resolution(sources, tmp_path):
    path = tmp_path / "dat_224.pth"
    torch.save({"model": sources["dat_pp_tiny"].state_dict()}, path)
    model = timm.create_model("dat_pp_tiny", img_size=256)
    assert model.stages[0].attns[1].rpe_table.shape == (2, 127, 127)
    load_encoder_weights(model, path)
    table = sources["dat_pp_tiny"].stages[3].attns[1].rpe_table
    resampled = model.stages[3].attns[1].rpe_table
    assert resampled.shape == (16, 15, 15)
    # bicubic resampling keeps the table's corners
    torch.testing.assert_close(resampled[:, 0, 0], table[:, 0, 0], atol=1e-5, rtol=0)
