"""COCO results and COCOeval scores: the ground truth itself scores AP 1 for boxes and masks, a
detection on a crowd region is ignored exactly as pycocotools run directly ignores it, labels
map back to the right category ids, no results score zeros, and the results survive JSON."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from data_tools.coco_synthetic import write_synthetic_coco
from finetune.detection.coco import CocoIndex
from finetune.detection.metrics import SUMMARY_NAMES, score_results, to_coco_results


@pytest.fixture(scope="module")
def val(tmp_path_factory: pytest.TempPathFactory) -> CocoIndex:
    root = write_synthetic_coco(tmp_path_factory.mktemp("coco"), train_images=1, val_images=10,
                                seed=5, min_size=64, max_size=96)
    return CocoIndex(root / "annotations" / "instances_val2017.json", root / "val2017")


def _perfect(index: CocoIndex, masks: bool = True) -> list[dict]:
    """The ground truth's usable objects as detections of score 1."""
    results = []
    for image_id in index.image_ids:
        target = index.target(image_id)
        results += to_coco_results(index, image_id, target["boxes"],
                                   torch.ones(len(target["labels"])), target["labels"],
                                   target["masks"].float()[:, None] if masks else None)
    return results


def _crowd(index: CocoIndex) -> tuple[dict, torch.Tensor]:
    """A crowd annotation of the file and its mask."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(index.annotation_file))
    crowd = next(a for a in coco.dataset["annotations"] if a["iscrowd"])
    return crowd, torch.from_numpy(coco.annToMask(crowd))


def _pycocotools(annotation_file: Path, results: list[dict], iou_type: str) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotation_file))
        typed = [{k: v for k, v in r.items() if k != ("bbox" if iou_type == "segm"
                                                       else "segmentation")} for r in results]
        evaluator = COCOeval(gt, gt.loadRes(typed), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(s) for s in evaluator.stats]


def test_the_ground_truth_scores_ap_one_for_boxes_and_masks(val: CocoIndex) -> None:
    scores = score_results(val.annotation_file, _perfect(val))
    assert set(scores) == {f"{t}/{n}" for t in ("bbox", "segm") for n in SUMMARY_NAMES}
    assert all(type(v) is float for v in scores.values())
    for iou_type in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75", "AR100"):
            assert scores[f"{iou_type}/{name}"] == pytest.approx(1.0)


def test_results_name_category_ids_and_xywh_boxes(val: CocoIndex) -> None:
    image_id = val.training_image_ids()[0]
    target = val.target(image_id)
    results = to_coco_results(val, image_id, target["boxes"], torch.ones(len(target["labels"])),
                              target["labels"])
    assert [r["category_id"] for r in results] == [val.category_of(int(k))
                                                   for k in target["labels"]]
    assert {r["category_id"] for r in results} <= {3, 17, 42}
    x1, y1, x2, y2 = target["boxes"][0].tolist()
    assert results[0]["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
    assert "segmentation" not in results[0] and results[0]["image_id"] == image_id


def test_a_wrong_category_lowers_ap(val: CocoIndex) -> None:
    results = _perfect(val)
    results[0]["category_id"] = next(c for c in (3, 17, 42) if c != results[0]["category_id"])
    scores = score_results(val.annotation_file, results)
    assert scores["bbox/AP"] < 0.999 and scores["segm/AP"] < 0.999


def test_a_detection_on_a_crowd_region_is_not_a_false_positive(val: CocoIndex) -> None:
    crowd, mask = _crowd(val)
    x, y, w, h = crowd["bbox"]
    on_crowd = to_coco_results(val, crowd["image_id"], torch.tensor([[x, y, x + w, y + h]]),
                               torch.ones(1), torch.tensor([val.label_of(crowd["category_id"])]),
                               mask[None].float())
    base = _perfect(val)
    with_crowd = score_results(val.annotation_file, base + on_crowd)
    assert with_crowd == score_results(val.annotation_file, base)
    assert with_crowd["bbox/AP"] == pytest.approx(1.0)
    for iou_type in ("bbox", "segm"):
        direct = _pycocotools(val.annotation_file, base + on_crowd, iou_type)
        assert [with_crowd[f"{iou_type}/{n}"] for n in SUMMARY_NAMES] == direct
    # the same detection of another category is a false positive
    elsewhere = [{**on_crowd[0], "category_id": next(c for c in (3, 17, 42)
                                                     if c != crowd["category_id"])}]
    assert score_results(val.annotation_file, base + elsewhere)["bbox/AP"] < 0.999


def test_no_results_score_zeros_and_box_only_results_skip_masks(val: CocoIndex) -> None:
    scores = score_results(val.annotation_file, [])
    assert len(scores) == 24 and set(scores.values()) == {0.0}
    boxes_only = score_results(val.annotation_file, _perfect(val, masks=False))
    assert sorted(boxes_only) == sorted(f"bbox/{n}" for n in SUMMARY_NAMES)
    assert boxes_only["bbox/AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="keypoints"):
        score_results(val.annotation_file, [], iou_types=("keypoints",))


def test_results_survive_a_json_round_trip_and_can_be_restricted(val: CocoIndex) -> None:
    results = _perfect(val)
    again = json.loads(json.dumps(results))
    assert score_results(val.annotation_file, again) == score_results(val.annotation_file,
                                                                      results)
    # detections of half the images only: the other images' objects are missed...
    half = val.image_ids[: len(val.image_ids) // 2]
    some = [r for r in results if r["image_id"] in half]
    assert score_results(val.annotation_file, some)["bbox/AR100"] < 1
    # ... unless the evaluation is restricted to those images
    assert score_results(val.annotation_file, some, image_ids=half)["bbox/AR100"] == \
        pytest.approx(1.0)
