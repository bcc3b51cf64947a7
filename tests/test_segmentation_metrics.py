"""mIoU / mAcc / aAcc from one confusion matrix, checked against a hand-computed one."""

from __future__ import annotations

import math

import pytest
import torch

from finetune.segmentation.metrics import ConfusionMatrix, confusion_matrix, scores

IGNORE = 255


def test_confusion_matrix_counts_and_ignores_by_hand() -> None:
    label = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE, IGNORE]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    expected = torch.tensor([[1, 1, 0, 0],   # gt 0: one right, one taken for 1
                             [0, 2, 0, 0],   # gt 1: both right
                             [1, 0, 1, 0],   # gt 2: one right, one taken for 0
                             [0, 0, 0, 0]])  # gt 3: absent; the ignored pixels count nowhere
    assert torch.equal(confusion_matrix(pred, label, 4, IGNORE), expected)


def test_scores_by_hand_with_a_class_absent_from_the_split() -> None:
    matrix = torch.tensor([[1, 1, 0, 0],
                           [0, 2, 0, 0],
                           [1, 0, 1, 0],
                           [0, 0, 0, 0]])
    result = scores(matrix, ["a", "b", "c", "d"])
    # IoU = tp / (gt + pred - tp): a 1/(2+2-1), b 2/(2+3-2), c 1/(2+1-1); d has no union
    assert result["IoU.a"] == pytest.approx(1 / 3)
    assert result["IoU.b"] == pytest.approx(2 / 3)
    assert result["IoU.c"] == pytest.approx(1 / 2)
    assert math.isnan(result["IoU.d"])
    assert result["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)  # d left out
    assert result["mAcc"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert result["aAcc"] == pytest.approx(4 / 6)


def test_a_class_absent_from_the_ground_truth_but_predicted_scores_zero() -> None:
    matrix = torch.tensor([[3, 1], [0, 0]])  # class 1 never in the ground truth, predicted once
    result = scores(matrix)
    assert result["IoU.1"] == 0.0
    assert result["mIoU"] == pytest.approx((3 / 4 + 0) / 2)
    assert result["mAcc"] == pytest.approx(3 / 4)  # accuracy only over present classes


def test_split_scores_are_not_a_mean_of_per_image_scores() -> None:
    # image 1: a large class-0 region, all right; image 2: one class-1 pixel, wrong
    images = [(torch.zeros(10, 10, dtype=torch.long), torch.zeros(10, 10, dtype=torch.long)),
              (torch.tensor([[0]]), torch.tensor([[1]]))]
    accumulated = ConfusionMatrix(2, IGNORE)
    for pred, label in images:
        accumulated.update(pred, label)
    result = scores(accumulated.summed())
    # split: class 0 IoU 100/101, class 1 IoU 0/1 -> (100/101) / 2
    assert result["mIoU"] == pytest.approx(100 / 101 / 2)
    per_image = [scores(confusion_matrix(p, t, 2, IGNORE))["mIoU"] for p, t in images]
    assert result["mIoU"] != pytest.approx(sum(per_image) / 2)


def test_labels_outside_the_classes_are_an_error() -> None:
    with pytest.raises(ValueError, match="outside 0..2"):
        confusion_matrix(torch.zeros(2, dtype=torch.long), torch.tensor([1, 7]), 3, IGNORE)
