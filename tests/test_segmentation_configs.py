"""Every ADE20K config validates, states the published figures of its row, follows its recipe
and builds its model (on the meta device): UPerNet models match the papers' parameter counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.config import FinetuneConfig, SegmentationConfig
from finetune.segmentation.task import build_segmentation_module
from finetune.transfer import resolve_spec
from pretrain.engine.config import CONFIG_ROOT, ConfigError, load_config
from pretrain.published import published

ADE = CONFIG_ROOT / "finetune" / "ade20k"
UPERNET = published("ade20k_upernet_160k")
FPN = published("ade20k_semantic_fpn_80k")
ROWS = [(f"upernet_{name}_160k", name, UPERNET[name]) for name in UPERNET] + [
    (f"semantic_fpn_{name}_80k", name, FPN[name]) for name in FPN]


def test_there_is_a_config_for_every_published_row() -> None:
    names = {p.stem for p in ADE.glob("[!_]*.yaml")} - {"demo"}  # _*.yaml: bases
    assert names == {row[0] for row in ROWS}
    assert len(ROWS) == 13


@pytest.mark.parametrize(("config", "encoder", "row"), ROWS, ids=[r[0] for r in ROWS])
def test_config_follows_its_recipe_and_builds(config: str, encoder: str, row: dict) -> None:
    path = ADE / f"{config}.yaml"
    cfg = load_config(FinetuneConfig, path, ["encoder.weights=null"])
    assert isinstance(cfg, SegmentationConfig) and cfg.encoder.name == encoder
    header = path.read_text().split("task:")[0]
    assert f"mIoU {row['miou']} single-scale" in header
    if "miou_ms" in row:
        assert f"{row['miou_ms']} multi-scale" in header
    assert "GPUs" in header
    data = cfg.data
    assert (data.num_classes, data.crop_size, data.scale, data.ratio_range) == (
        150, 512, (2048, 512), (0.5, 2.0))
    assert data.reduce_zero_label and data.cat_max_ratio == 0.75 and data.classes == "ade20k"
    assert data.batch_size * 8 == 16  # the recipes' batch on the 8 GPUs the header assumes
    schedule, optimizer = cfg.schedule, cfg.optimizer
    if cfg.model.kind == "upernet":
        assert (optimizer.lr, optimizer.weight_decay) == (6e-5, 0.01)
        assert (schedule.steps, schedule.warmup_steps, schedule.power) == (160000, 1500, 1.0)
        assert (cfg.model.decoder_channels, cfg.model.aux_weight) == (512, 0.4)
    else:
        assert (optimizer.lr, optimizer.weight_decay) == (2e-4, 1e-4)
        assert (schedule.steps, schedule.power) == (80000, 0.9)
        assert (cfg.model.decoder_channels, cfg.model.aux_weight) == (256, 0.0)
    assert schedule.decay == "poly" and cfg.model.dropout == 0.1

    spec = resolve_spec(None, cfg.encoder.name, cfg.encoder.overrides)
    with torch.device("meta"):
        module = build_segmentation_module(cfg, spec, None)
    head = module.model.decode_head.cls[1]
    assert head.out_channels == 150
    if "params_m" in row:  # the papers count the auxiliary head too
        params = sum(p.numel() for p in module.parameters()) / 1e6
        assert params == pytest.approx(row["params_m"], abs=0.6)


def test_a_bad_segmentation_field_is_one_line_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"data\.classes must list data\.num_classes"):
        load_config(FinetuneConfig, ADE / "upernet_davit_tiny_160k.yaml",
                    ["data.classes=[a, b]"])
    with pytest.raises(ConfigError, match=r"model\.kind"):
        load_config(FinetuneConfig, ADE / "upernet_davit_tiny_160k.yaml", ["model.kind=fcn"])
    with pytest.raises(ConfigError, match="eval.overlays"):
        load_config(FinetuneConfig, ADE / "upernet_davit_tiny_160k.yaml", ["eval.overlays=3"])


def test_check_names_a_missing_dataset_folder_or_unfitting_weights(tmp_path: Path) -> None:
    from finetune.registry import check_inputs
    from finetune.segmentation.synthetic import write_synthetic_ade

    config = ADE / "upernet_davit_tiny_160k.yaml"
    cfg = load_config(FinetuneConfig, config, [f"data.root={tmp_path / 'nowhere'}"])
    with pytest.raises(FileNotFoundError, match="nowhere/images/training"):
        check_inputs(cfg)
    root = write_synthetic_ade(tmp_path / "ade", train=2, val=1)
    cfg = load_config(FinetuneConfig, config, [f"data.root={root}"])
    with pytest.raises(FileNotFoundError, match="pretrained/davit_tiny.pth"):
        check_inputs(cfg)
    # an official segmentation checkpoint of another encoder: one line naming the file
    state = {f"backbone.{k}": v for k, v in
             torch.nn.Linear(2, 2).state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "upernet.pth")
    cfg = load_config(FinetuneConfig, config, [f"data.root={root}",
                                               f"encoder.weights={tmp_path / 'upernet.pth'}"])
    with pytest.raises(ValueError, match="upernet.pth.*does not fit") as error:
        check_inputs(cfg)
    assert "\n" not in str(error.value)
