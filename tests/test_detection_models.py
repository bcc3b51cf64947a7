"""finetune/detection/models.py and cascade.py in one process: every detector kind trains a
step and predicts in the original image's pixel frame, on every encoder family; official mmdet
checkpoints load their backbone (with the per-level norms) into the detector; the cascade's
stages regress per class and average their scores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.backbone import Backbone
from finetune.config import DetectionConfig
from finetune.detection.cascade import CascadeRoIHeads, _class_deltas
from finetune.detection.task import build_detection_module
from pretrain.encoders.spec import ModelSpec
from tests.test_backbone import SPECS, _official_checkpoint, _randomise_norms

SMALL_HEADS = {"fpn_channels": 32, "head_channels": 32, "fc_channels": 64}


def _cfg(kind: str, spec: ModelSpec, **model: object) -> DetectionConfig:
    return DetectionConfig.model_validate({
        "task": "detection",
        "encoder": {"name": spec.timm_name, "overrides": spec.overrides, "drop_path": 0.0},
        "model": {"kind": kind, **SMALL_HEADS, **model}, "data": {"batch_size": 2},
        "schedule": {"steps": 10}, "eval": {"min_size": 96, "max_size": 160}})


def _batch() -> dict:
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8, generator=generator),
              torch.randint(0, 256, (3, 112, 80), dtype=torch.uint8, generator=generator)]
    masks = torch.zeros(2, 96, 128, dtype=torch.uint8)
    masks[0, 10:40, 10:50] = 1
    masks[1, 50:90, 60:120] = 1
    targets = [{"boxes": torch.tensor([[10.0, 10, 50, 40], [60, 50, 120, 90]]),
                "labels": torch.tensor([1, 3]), "masks": masks},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "masks": torch.zeros(0, 112, 80, dtype=torch.uint8)}]  # an image without objects
    return {"images": images, "targets": targets}


@pytest.mark.parametrize("kind", ["mask_rcnn", "retinanet", "cascade_mask_rcnn"])
@pytest.mark.parametrize("family", list(SPECS))
def test_every_detector_trains_and_predicts_on_every_family(kind: str, family: str) -> None:
    if family != "davit" and kind != "mask_rcnn":
        pytest.skip("the heads do not depend on the family: Mask R-CNN covers the encoders")
    torch.manual_seed(0)
    module = build_detection_module(_cfg(kind, SPECS[family]), SPECS[family], None,
                                    num_classes=3)
    batch = _batch()
    module.train()
    output = module(batch)
    assert torch.isfinite(output["loss"])
    parts = sum(float(v.detach()) for k, v in output.items() if k != "loss")
    assert float(output["loss"]) == pytest.approx(parts)
    output["loss"].backward()
    trunk = module.backbone.body.body
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trunk.parameters())
    module.eval()
    with torch.no_grad():
        predictions = module.predict(batch["images"])
    for image, prediction in zip(batch["images"], predictions, strict=True):
        height, width = image.shape[-2:]
        boxes = prediction["boxes"]
        assert len(boxes) <= 100 and prediction["scores"].ge(0.05).all()
        assert (boxes[:, 2] <= width + 1e-3).all() and (boxes[:, 3] <= height + 1e-3).all()
        if len(prediction["labels"]):
            assert prediction["labels"].min() >= 1 and prediction["labels"].max() <= 3
        if kind != "retinanet":  # masks pasted at the original image's size
            assert prediction["masks"].shape[-2:] == (height, width)
        else:
            assert "masks" not in prediction


def test_training_images_are_not_resized_again() -> None:
    """The stream's augmentation resized them (seeded, resumable); the model only pads."""
    spec = SPECS["davit"]
    module = build_detection_module(_cfg("mask_rcnn", spec), spec, None, num_classes=3)
    transform = module.detector.transform
    images = [torch.rand(3, 96, 128), torch.rand(3, 112, 80)]
    transform.train()
    batched, _ = transform(images)
    assert batched.image_sizes == [(96, 128), (112, 80)]
    assert batched.tensors.shape[-2:] == (128, 128)  # padded to multiples of 32
    transform.eval()  # evaluation: the test scale (short side 96 here, long side <= 160)
    batched, _ = transform(images)
    assert batched.image_sizes == [(96, 128), (134, 96)]


@pytest.mark.parametrize(("kind", "levels"), [("mask_rcnn", (0, 1, 2, 3)),
                                              ("retinanet", (1, 2, 3))])
def test_official_detection_checkpoint_loads_backbone_and_norms(kind: str, levels: tuple,
                                                                tmp_path: Path) -> None:
    spec = SPECS["davit"]
    torch.manual_seed(1)
    source = Backbone(spec, out_indices=levels).eval()
    _randomise_norms(source)
    state = _official_checkpoint(source, "davit")
    state["neck.lateral_convs.0.conv.weight"] = torch.zeros(256, 16, 1, 1)  # not the backbone's
    state["rpn_head.rpn_conv.weight"] = torch.zeros(256, 256, 3, 3)
    path = tmp_path / f"{kind}_official.pth"
    torch.save({"meta": {"CLASSES": ["person"]}, "state_dict": state}, path)
    cfg = _cfg(kind, spec).model_copy(update={"encoder": _cfg(kind, spec).encoder.model_copy(
        update={"weights": str(path)})})
    module = build_detection_module(cfg, spec, str(path), num_classes=3).eval()
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for got, expected in zip(module.backbone.body(image), source(image), strict=True):
            torch.testing.assert_close(got, expected)


def test_cascade_regresses_per_class_and_averages_stage_scores() -> None:
    deltas = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 12)
    assert _class_deltas(deltas, torch.tensor([2, 0])).tolist() == [[8, 9, 10, 11],
                                                                     [12, 13, 14, 15]]
    spec = SPECS["davit"]
    torch.manual_seed(0)
    module = build_detection_module(_cfg("cascade_mask_rcnn", spec), spec, None, num_classes=3)
    heads = module.detector.roi_heads
    assert isinstance(heads, CascadeRoIHeads)
    assert [m.high_threshold for m in heads.matchers] == [0.5, 0.6, 0.7]
    assert [c.weights for c in heads.coders] == [(10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0),
                                                 (30.0, 30.0, 15.0, 15.0)]
    assert len(heads.mask_heads) == len(heads.box_heads) == 3
    # each stage's box head has four BatchNorm convs and one fc (4conv1fc)
    convs = [m for m in heads.box_heads[0].modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4
    assert heads.box_predictors[0].bbox_pred.out_features == 4 * 4  # per class + background
    module.train()
    output = module(_batch())
    for stage, weight in enumerate((1.0, 0.5, 0.25)):
        assert f"loss_cls_s{stage}" in output and f"loss_mask_s{stage}" in output, weight
    # the stage losses are weighted: an untrained cascade's classifiers are alike, so the
    # weighted losses fall with the stage's weight
    assert output["loss_cls_s0"] > output["loss_cls_s1"] > output["loss_cls_s2"]


@pytest.mark.parametrize("layer_decay", [None, 0.8])
def test_parameter_groups_spare_norms_and_cover_every_parameter_once(
        layer_decay: float | None, tmp_path: Path) -> None:
    from data_tools.coco_synthetic import write_synthetic_coco
    from finetune.detection.task import DetectionTask

    root = write_synthetic_coco(tmp_path / "coco", train_images=4, val_images=2)
    spec = SPECS["davit"]
    cfg = _cfg("mask_rcnn", spec)
    cfg = cfg.model_copy(update={
        "encoder": cfg.encoder.model_copy(update={"layer_decay": layer_decay}),
        "data": cfg.data.model_copy(update={"root": str(root)})})
    task = DetectionTask(cfg)
    module = task.build_module()
    groups = task.param_groups(module)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in module.parameters())  # each exactly once
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(module.named_parameters())
    for name, parameter in named.items():
        if parameter.ndim <= 1:  # norms and biases
            assert decay_of[id(parameter)] == 0.0, name
    assert decay_of[id(named["detector.backbone.fpn.layer_blocks.0.0.weight"])] == 0.05
    head = lr_of[id(named["detector.roi_heads.box_predictor.cls_score.weight"])]
    stem = lr_of[id(named["detector.backbone.body.body.stem.conv.weight"])]
    assert head == cfg.optimizer.lr
    last = lr_of[id(named["detector.backbone.body.body.stages.3.blocks.0.0.attn.qkv.weight"])]
    if layer_decay is None:
        assert stem == last == head
    else:  # timm's layer groups: the stem decays most, the last stage least
        assert stem < last <= head
        assert stem == pytest.approx(head * layer_decay ** 4)
