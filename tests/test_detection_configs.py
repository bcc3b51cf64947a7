"""Every COCO config validates, states the published figures of its row, follows its recipe
and builds its model (on the meta device) with the papers' parameter counts."""

from __future__ import annotations

import pytest
import torch

from finetune.config import DetectionConfig, FinetuneConfig
from finetune.detection.task import build_detection_module
from finetune.transfer import resolve_spec
from pretrain.engine.config import CONFIG_ROOT, ConfigError, load_config
from pretrain.published import published

COCO = CONFIG_ROOT / "finetune" / "coco"
BACKBONES = ("davit_tiny", "davit_small", "davit_base", "dat_pp_tiny", "dat_pp_small")
CASCADE = ("dwnet_tiny", "dwnet_base", "dynamic_dwnet_tiny", "dynamic_dwnet_base",
           "dat_pp_tiny", "dat_pp_small", "dat_pp_base")
TABLES = {"mask_rcnn": "coco_mask_rcnn", "retinanet": "coco_retinanet",
          "cascade_mask_rcnn": "coco_cascade_mask_rcnn_3x"}
ROWS = ([(kind, name, schedule) for kind in ("mask_rcnn", "retinanet") for name in BACKBONES
         for schedule in ("1x", "3x")] + [("cascade_mask_rcnn", name, "3x") for name in CASCADE])


def _published_row(kind: str, name: str, schedule: str) -> dict | None:
    row = published(TABLES[kind]).get(name)
    if row is None or kind == "cascade_mask_rcnn":
        return row
    return {**row.get("1x", {}), **row[schedule]} if schedule in row else None


def test_there_is_a_config_for_every_required_row() -> None:
    names = {p.stem for p in COCO.glob("[!_]*.yaml")} - {"demo"}  # _*.yaml: bases
    assert names == {f"{kind}_{name}_{schedule}" for kind, name, schedule in ROWS}
    assert len(ROWS) == 27
    # every row the published tables hold has its config
    for kind, table in TABLES.items():
        for name in published(table):
            assert any(r[:2] == (kind, name) for r in ROWS), (kind, name)


@pytest.mark.parametrize(("kind", "name", "schedule"), ROWS,
                         ids=[f"{k}_{n}_{s}" for k, n, s in ROWS])
def test_config_follows_its_recipe_and_builds(kind: str, name: str, schedule: str) -> None:
    path = COCO / f"{kind}_{name}_{schedule}.yaml"
    cfg = load_config(FinetuneConfig, path, ["encoder.weights=null"])
    assert isinstance(cfg, DetectionConfig)
    assert (cfg.model.kind, cfg.encoder.name) == (kind, name)
    header = path.read_text().split("task:")[0]
    row = _published_row(kind, name, schedule)
    if row is None:
        assert "not in pretrain/published.yaml" in header
    else:
        assert f"box AP {row['box']}" in header
        if "mask" in row:
            assert f"mask AP {row['mask']}" in header
    assert "8 GPUs x 2 images" in header and cfg.data.batch_size * 8 == 16
    optimizer, schedule_cfg, data = cfg.optimizer, cfg.schedule, cfg.data
    assert (optimizer.lr, optimizer.weight_decay) == (1e-4, 0.05)
    assert (schedule_cfg.warmup_steps, schedule_cfg.warmup_start) == (500, 0.001)
    assert schedule_cfg.decay == "step" and schedule_cfg.gamma == 0.1
    three = schedule == "3x"
    assert schedule_cfg.epochs == (36 if three else 12)
    assert schedule_cfg.milestones == ([27, 33] if three else [8, 11])
    assert data.policy == ("crop" if three else "multiscale")
    assert data.scales == (list(range(480, 801, 32)) if three else [800])
    assert data.max_size == 1333 and (cfg.eval.min_size, cfg.eval.max_size) == (800, 1333)
    assert (cfg.eval.score_thresh, cfg.eval.nms_thresh, cfg.eval.detections) == (0.05, 0.5, 100)
    if kind == "cascade_mask_rcnn":
        assert cfg.model.resolved_box_head() == "4conv1fc"
        assert cfg.model.cascade_ious == (0.5, 0.6, 0.7)

    spec = resolve_spec(None, cfg.encoder.name, cfg.encoder.overrides)
    with torch.device("meta"):
        module = build_detection_module(cfg, spec, None, num_classes=80)
    if row is not None and "params_m" in row:
        params = sum(p.numel() for p in module.parameters()) / 1e6
        assert params == pytest.approx(row["params_m"], abs=0.7)


def test_a_bad_detection_field_is_one_line_naming_it() -> None:
    config = COCO / "mask_rcnn_davit_tiny_1x.yaml"
    with pytest.raises(ConfigError, match=r"model\.kind"):
        load_config(FinetuneConfig, config, ["model.kind=yolo"])
    with pytest.raises(ConfigError, match=r"data\.scales"):
        load_config(FinetuneConfig, config, ["data.scales=[]"])
    with pytest.raises(ConfigError, match="RetinaNet predicts no masks"):
        load_config(FinetuneConfig, COCO / "retinanet_davit_tiny_1x.yaml",
                    ["eval.best_metric=segm/AP"])


def test_check_names_a_missing_folder_or_a_broken_json(tmp_path) -> None:
    from data_tools.coco_synthetic import write_synthetic_coco
    from finetune.registry import check_inputs

    config = COCO / "mask_rcnn_davit_tiny_1x.yaml"
    root = write_synthetic_coco(tmp_path / "coco", train_images=4, val_images=2)
    check_inputs(load_config(FinetuneConfig, config, ["encoder.weights=null",
                                                      f"data.root={root}"]))
    with pytest.raises(FileNotFoundError, match="data.val_images: no such folder"):
        check_inputs(load_config(FinetuneConfig, config, [
            "encoder.weights=null", f"data.root={root}", "data.val_images=missing"]))
    (root / "annotations" / "instances_val2017.json").write_text("{not json")
    with pytest.raises(ValueError, match="instances_val2017.json"):
        check_inputs(load_config(FinetuneConfig, config, ["encoder.weights=null",
                                                          f"data.root={root}"]))
