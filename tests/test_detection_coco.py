"""CocoIndex on a hand-made instances json: category ids with gaps mapped to contiguous labels
and back, masks decoded exactly as pycocotools' own annToMask (two-part polygon, uncompressed
and compressed RLE), crowd and degenerate objects kept out of targets and of training, unsafe
file names refused, and one-line errors naming the file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from pycocotools.coco import COCO

from data_tools.coco_synthetic import uncompressed_rle
from finetune.detection.coco import CocoIndex


def _rect(height: int, width: int, rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[rows, cols] = 1
    return mask


def _dataset() -> dict:
    compressed = mask_utils.encode(np.asfortranarray(_rect(20, 30, slice(12, 19),
                                                           slice(18, 30))))
    compressed["counts"] = compressed["counts"].decode("ascii")
    ann = {"iscrowd": 0, "area": 1.0}
    return {
        # unsorted, with gaps
        "categories": [{"id": 7, "name": "seven"}, {"id": 2, "name": "two"},
                       {"id": 40, "name": "forty"}],
        "images": [
            {"id": 1, "file_name": "a.jpg", "height": 20, "width": 30},
            {"id": 2, "file_name": "sub/b.jpg", "height": 10, "width": 10},
            {"id": 3, "file_name": "c.jpg", "height": 8, "width": 8},
            {"id": 4, "file_name": "../escape.jpg", "height": 8, "width": 8},
            {"id": 5, "file_name": "/etc/passwd", "height": 8, "width": 8},
        ],
        "annotations": [
            {**ann, "id": 11, "image_id": 1, "category_id": 7, "bbox": [2, 2, 14, 6],
             "segmentation": [[2, 2, 8, 2, 8, 8, 2, 8], [12, 2, 16, 2, 16, 6]]},
            {**ann, "id": 12, "image_id": 1, "category_id": 40, "bbox": [3, 10, 7, 5],
             "segmentation": uncompressed_rle(_rect(20, 30, slice(10, 15), slice(3, 10)))},
            # the box runs past the image: clipped to (18, 12, 30, 20)
            {**ann, "id": 13, "image_id": 1, "category_id": 2, "bbox": [18, 12, 15, 10],
             "segmentation": compressed},
            {**ann, "id": 14, "image_id": 1, "category_id": 2, "bbox": [20, 0, 8, 8],
             "iscrowd": 1,
             "segmentation": uncompressed_rle(_rect(20, 30, slice(0, 8), slice(20, 28)))},
            # left of the image: nothing left once clipped
            {**ann, "id": 15, "image_id": 1, "category_id": 7, "bbox": [-5, 2, 4.5, 3],
             "segmentation": [[0, 2, 0, 5, 0.5, 5]]},
            # image 2: a box half a pixel wide and a crowd region only
            {**ann, "id": 21, "image_id": 2, "category_id": 40, "bbox": [3, 3, 0.5, 4],
             "segmentation": [[3, 3, 3.5, 3, 3.5, 7, 3, 7]]},
            {**ann, "id": 22, "image_id": 2, "category_id": 40, "bbox": [0, 0, 4, 4],
             "iscrowd": 1, "segmentation": uncompressed_rle(_rect(10, 10, slice(0, 4),
                                                                  slice(0, 4)))},
        ],
    }


@pytest.fixture()
def annotation_file(tmp_path: Path) -> Path:
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps(_dataset()))
    return path


def test_category_ids_map_to_contiguous_labels_and_back(annotation_file: Path) -> None:
    index = CocoIndex(annotation_file, annotation_file.parent)
    assert index.category_ids == [2, 7, 40] and index.num_classes == 3
    assert index.category_names == ["two", "seven", "forty"]
    assert [index.label_of(c) for c in (2, 7, 40)] == [1, 2, 3]
    assert [index.category_of(k) for k in (1, 2, 3)] == [2, 7, 40]
    for bad in (0, 4):
        with pytest.raises(ValueError, match="not in 1..3"):
            index.category_of(bad)
    with pytest.raises(ValueError, match="unknown category 3"):
        index.label_of(3)
    assert index.image_ids == [1, 2, 3, 4, 5]
    assert index.image_size(1) == (20, 30)


def test_training_keeps_only_images_with_a_usable_object(annotation_file: Path) -> None:
    # 2 has only a degenerate box and a crowd region, 3-5 have nothing
    assert CocoIndex(annotation_file, annotation_file.parent).training_image_ids() == [1]


def test_targets_match_pycocotools_and_leave_out_crowd_and_degenerate(annotation_file: Path
                                                                      ) -> None:
    index = CocoIndex(annotation_file, annotation_file.parent)
    target = index.target(1)
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (3, 20, 30)
    # annotations 11, 12, 13: the crowd (14) and the box left of the image (15) are out
    assert target["labels"].tolist() == [2, 3, 1]
    assert target["boxes"].tolist() == [[2, 2, 16, 8], [3, 10, 10, 15], [18, 12, 30, 20]]
    coco = COCO(str(annotation_file))
    for mask, ann_id in zip(target["masks"], (11, 12, 13), strict=True):
        assert np.array_equal(mask.numpy(), coco.annToMask(coco.anns[ann_id]))
    two_parts = target["masks"][0]
    assert two_parts[2:8, 2:8].all() and two_parts[:, 9:12].sum() == 0  # the gap
    assert two_parts[:, 12:16].sum() > 0  # the second part
    empty = index.target(2)
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    assert empty["masks"].shape == (0, 10, 10)


def test_file_names_outside_the_image_root_are_refused(annotation_file: Path) -> None:
    index = CocoIndex(annotation_file, annotation_file.parent / "images")
    assert index.image_path(2) == annotation_file.parent / "images" / "sub" / "b.jpg"
    for image_id in (4, 5):
        with pytest.raises(ValueError, match="outside"):
            index.image_path(image_id)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.pop("categories"), "no 'categories' list"),
    (lambda d: d["annotations"][0].update(category_id=3), "annotation 11 .*unknown category 3"),
    (lambda d: d["annotations"][1].update(image_id=9), "annotation 12 .*unknown image 9"),
    (lambda d: d["annotations"][2].pop("bbox"), "annotation 13 lacks"),
    (lambda d: d["images"].append(dict(d["images"][0])), "image id 1 appears twice"),
])
def test_bad_files_are_one_line_errors_naming_the_file(
        tmp_path: Path, edit: Callable[[dict], object], message: str) -> None:
    data = _dataset()
    edit(data)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"^{path}: {message}") as error:
        CocoIndex(path, tmp_path)
    assert "\n" not in str(error.value)


def test_missing_and_unparsable_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope.json'}: no such"):
        CocoIndex(tmp_path / "nope.json", tmp_path)
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(ValueError, match=f"^{broken}: not valid JSON"):
        CocoIndex(broken, tmp_path)


def test_a_bad_segmentation_is_an_error_naming_the_annotation(tmp_path: Path) -> None:
    data = _dataset()
    data["annotations"][0]["segmentation"] = [[1, 1, 2, 2]]  # two points
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="annotation 11: a polygon needs at least three"):
        CocoIndex(path, tmp_path).target(1)
