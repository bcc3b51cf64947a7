"""COCO detection data: the synthetic COCO writer, the recipes' augmentations (boxes stay on
their masks, flips mirror them), and the training stream (grouped by aspect, every epoch
split between ranks and workers, exact resume through TrainLoader, unreadable images skipped
and counted) and the validation slices."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from data_tools.coco_synthetic import main as synthetic_main
from data_tools.coco_synthetic import write_synthetic_coco
from finetune.detection.coco import CocoIndex
from finetune.detection.data import (
    CocoTrainStream,
    CocoValSplit,
    DetectionAugment,
    aspect_group,
)
from pretrain.engine.errors import TrainingAborted
from pretrain.engine.skipped import SkipLog, read_skipped
from pretrain.engine.stream import StreamState, TrainLoader


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_coco(tmp_path_factory.mktemp("coco"), train_images=24, val_images=6,
                                seed=1, min_size=64, max_size=96)


def _index(root: Path, split: str = "train2017") -> CocoIndex:
    return CocoIndex(root / "annotations" / f"instances_{split}.json", root / split)


def _augment(policy: str = "crop") -> DetectionAugment:
    return DetectionAugment(policy, scales=(48, 56, 64), max_size=100, crop_scales=(64, 72),
                            crop_size=(32, 56))


def _stream(index: CocoIndex, state: StreamState, rank: int = 0, world: int = 1,
            workers: int = 0, batch: int = 2, policy: str = "crop") -> CocoTrainStream:
    return CocoTrainStream(index, _augment(policy), batch, seed=7, rank=rank, world_size=world,
                           num_workers=workers, state=state)


def test_the_synthetic_coco_has_what_real_coco_has(coco: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    train = COCO(str(coco / "annotations" / "instances_train2017.json"))
    assert sorted(train.getCatIds()) == [3, 17, 42, 60]
    assert {a["category_id"] for a in train.dataset["annotations"]} == {3, 17, 42}
    images = train.dataset["images"]
    assert len(images) == 24 and all((coco / "train2017" / i["file_name"]).is_file()
                                     for i in images)
    assert {aspect_group(i["height"], i["width"]) for i in images} == {0, 1}
    annotations = train.dataset["annotations"]
    crowd = [a for a in annotations if a["iscrowd"]]
    assert crowd and all(isinstance(a["segmentation"]["counts"], list) for a in crowd)
    assert any(len(a["segmentation"]) == 2 for a in annotations if not a["iscrowd"])
    per_image = {i["id"]: train.getAnnIds(imgIds=i["id"]) for i in images}
    empty = [i for i, anns in per_image.items() if not anns]
    crowd_only = [i for i, anns in per_image.items()
                  if anns and all(train.anns[a]["iscrowd"] for a in anns)]
    assert empty and len(crowd_only) == 1
    index = _index(coco)
    assert index.category_ids == [3, 17, 42, 60] and index.num_classes == 4
    assert set(index.training_image_ids()) == set(per_image) - set(empty) - set(crowd_only)
    for image_id in index.training_image_ids()[:6]:  # masks are pycocotools' own
        target = index.target(image_id)
        anns = [train.anns[a] for a in per_image[image_id] if not train.anns[a]["iscrowd"]]
        for mask, ann in zip(target["masks"], anns, strict=True):
            assert np.array_equal(mask.numpy(), train.annToMask(ann))
    assert COCO(str(coco / "annotations" / "instances_val2017.json")).getImgIds()
    # the same seed writes the same files, through the command line too
    synthetic_main(["--out", str(tmp_path), "--train", "24", "--val", "6", "--seed", "1",
                    "--min-size", "64", "--max-size", "96"])
    assert "train2017: 24 images" in capsys.readouterr().out
    for name in ("annotations/instances_train2017.json", "train2017/000000000001.jpg"):
        assert (tmp_path / name).read_bytes() == (coco / name).read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        synthetic_main(["--out", str(tmp_path), "--train", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def _rect_target(height: int, width: int, boxes: list[list[int]]) -> dict[str, torch.Tensor]:
    masks = torch.zeros(len(boxes), height, width, dtype=torch.uint8)
    for mask, (x1, y1, x2, y2) in zip(masks, boxes, strict=True):
        mask[y1:y2, x1:x2] = 1
    return {"boxes": torch.tensor(boxes, dtype=torch.float32),
            "labels": torch.arange(1, len(boxes) + 1), "masks": masks}


def _mask_box(mask: torch.Tensor) -> list[int]:
    rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


@pytest.mark.parametrize("policy", ["multiscale", "crop"])
def test_augmented_boxes_stay_on_their_masks(policy: str) -> None:
    image = torch.randint(0, 256, (3, 60, 90), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    target = _rect_target(60, 90, [[2, 3, 20, 30], [40, 10, 88, 25], [30, 40, 60, 58]])
    augment = _augment(policy)
    shorts, removed = set(), 0
    for seed in range(24):
        out, got = augment(image, target, torch.Generator().manual_seed(seed))
        assert out.dtype == torch.uint8 and out.shape[0] == 3
        assert got["masks"].shape[1:] == out.shape[1:]
        assert len(got["boxes"]) == len(got["labels"]) == len(got["masks"])
        shorts.add(min(out.shape[1:]))
        removed += 3 - len(got["labels"])
        for box, mask in zip(got["boxes"].tolist(), got["masks"], strict=True):
            assert mask.any()
            # nearest-neighbour masks: half a pixel per resize, the crop branch's second one
            # magnifying the first
            assert np.abs(np.array(box) - _mask_box(mask)).max() <= 2.0
    assert shorts == {48, 56, 64}  # every scale drawn; the aspect keeps the long side <= 100
    if policy == "crop":
        assert removed > 0  # some crops leave objects out
    assert augment(image, target, torch.Generator().manual_seed(3))[0].equal(
        augment(image, target, torch.Generator().manual_seed(3))[0])


def test_flip_mirrors_boxes_and_masks() -> None:
    image = torch.zeros(3, 10, 40, dtype=torch.uint8)
    target = _rect_target(10, 40, [[2, 1, 10, 6]])
    flipped, got = DetectionAugment("none", (), 0, flip=1.0)(image, target, torch.Generator())
    assert got["boxes"].tolist() == [[30, 1, 38, 6]] == [_mask_box(got["masks"][0])]
    assert flipped.shape == image.shape
    _, kept = DetectionAugment("none", (), 0, flip=0.0)(image, target, torch.Generator())
    assert kept["boxes"].equal(target["boxes"])


def test_batches_are_grouped_by_aspect_and_never_empty(coco: Path) -> None:
    batches = iter(_stream(_index(coco), StreamState.fresh(1), batch=3, policy="none"))
    groups = set()
    for _ in range(10):
        batch = next(batches)
        assert len(batch["images"]) == len(batch["targets"]) == 3
        aspects = {aspect_group(*image.shape[1:]) for image in batch["images"]}
        assert len(aspects) == 1
        groups |= aspects
        for image, target in zip(batch["images"], batch["targets"], strict=True):
            assert image.dtype == torch.uint8 and target["masks"].shape[1:] == image.shape[1:]
            assert len(target["labels"]) >= 1  # "none" crops nothing away
    assert groups == {0, 1}


def test_every_epoch_is_split_between_ranks_and_workers(coco: Path) -> None:
    index = _index(coco)
    ids = index.training_image_ids()
    world, workers = 2, 2
    slots = world * workers
    seen = []
    for rank in range(world):
        stream = _stream(index, StreamState.fresh(workers), rank, world, workers)
        for worker in range(workers):
            slot = rank * workers + worker
            seen += [stream.sample_at(n * slots + slot)
                     for n in range(len(ids) // slots + 1) if n * slots + slot < len(ids)]
    assert sorted(seen) == sorted(ids)
    stream = _stream(index, StreamState.fresh(1))
    first = [stream.sample_at(n) for n in range(len(ids))]
    second = [stream.sample_at(len(ids) + n) for n in range(len(ids))]
    assert first != second and sorted(first) == sorted(second)


def _batches(index: CocoIndex, state: StreamState, count: int, workers: int) -> list[dict]:
    loader = TrainLoader(_stream(index, state, rank=1, world=2, workers=workers), workers)
    try:
        return [next(loader) for _ in range(count)]
    finally:
        loader.close()


def _assert_same(expected: dict, got: dict) -> None:
    assert len(expected["images"]) == len(got["images"])
    for image, other in zip(expected["images"], got["images"], strict=True):
        assert torch.equal(image, other)
    for target, other in zip(expected["targets"], got["targets"], strict=True):
        assert target.keys() == other.keys() == {"boxes", "labels", "masks"}
        assert all(torch.equal(target[k], other[k]) for k in target)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_yields_the_same_batches(coco: Path, workers: int) -> None:
    index = _index(coco)
    reference = _batches(index, StreamState.fresh(workers), 8, workers)
    for stop in (2, 3, 5):  # positions with and without images waiting in the other group
        state = StreamState.fresh(workers)
        _batches(index, state, stop, workers)
        resumed = StreamState.from_dict(json.loads(json.dumps(state.to_dict())))
        rest = _batches(index, resumed, 8 - stop, workers)
        for expected, got in zip(reference[stop:], rest, strict=True):
            _assert_same(expected, got)
        assert resumed.micro_batches == 8
    # the other rank gets other images
    other = next(iter(_stream(index, StreamState.fresh(1), rank=0, world=2)))
    assert not all(torch.equal(a, b) for a, b in zip(other["images"], reference[0]["images"],
                                                     strict=False))


def test_unreadable_images_are_skipped_and_counted(coco: Path, tmp_path: Path) -> None:
    root = tmp_path / "coco"
    shutil.copytree(coco, root)
    index = _index(root)
    ids = index.training_image_ids()
    path = index.image_path(ids[0])
    path.write_bytes(path.read_bytes()[:200])  # a truncated JPEG
    batches = iter(_stream(index, StreamState.fresh(1), batch=3, policy="none"))
    images = 0
    while True:
        batch = next(batches)
        assert batch["images"]  # never an empty batch
        images += len(batch["images"])
        if batch["position"]["consumed"] >= 3 * len(ids):
            break
    bad = batch["position"]["bad_samples"]
    assert bad >= 2  # the file came up in at least two of (at least) three epochs
    # every item taken was yielded, counted bad, or waits in the other aspect group
    assert 0 <= batch["position"]["consumed"] - images - bad < 3
    val_path = _index(root, "val2017").image_path(_index(root, "val2017").image_ids[0])
    val_path.write_bytes(b"not a jpeg")
    slices = [list(CocoValSplit(_index(root, "val2017"), rank, 2)) for rank in range(2)]
    assert sum(b["skipped"] for s in slices for b in s) == 1
    assert len([b for s in slices for b in s]) == 5


def test_a_folder_of_unreadable_images_aborts(coco: Path, tmp_path: Path) -> None:
    """In a real DataLoader worker: one line naming the split and its first files, within
    seconds, the worker stopped, every failure in the skip list (issue 23: a RuntimeError in
    the worker left the job waiting on it for ever)."""
    root = tmp_path / "coco"
    shutil.copytree(coco, root)
    for path in (root / "train2017").iterdir():
        path.write_bytes(b"broken")
    index = _index(root)
    stream = CocoTrainStream(index, _augment("none"), 2, seed=7, rank=0, world_size=1,
                             num_workers=1, state=StreamState.fresh(1),
                             source="data.train_images X", skips=SkipLog(tmp_path / "run"))
    loader = TrainLoader(stream, 1)
    started = time.monotonic()
    with pytest.raises(TrainingAborted) as raised:
        next(loader)
    assert time.monotonic() - started < 30
    message = str(raised.value)
    assert "\n" not in message
    files = len(index.training_image_ids())  # a split smaller than 1000 gives up sooner
    assert message.startswith(f"data.train_images X: the last {files} images read all failed "
                              "to decode (the train split; first ")
    assert str(index.image_path(index.training_image_ids()[0]).parent) in message
    assert "UnidentifiedImageError" in message
    assert loader._iterator is None  # the worker was shut down
    listed = read_skipped(tmp_path / "run")
    paths = [r["path"] for r in listed]
    assert len(set(paths)) == len(paths) >= files // 2  # each file listed once
    assert {r["split"] for r in listed} == {"train"}


def test_validation_covers_every_image_once_at_its_size(coco: Path) -> None:
    index = _index(coco, "val2017")
    seen = []
    for rank in range(2):
        for batch in CocoValSplit(index, rank, 2):
            (image,) = batch["images"]
            image_id = int(batch["image_id"])
            assert tuple(image.shape[1:]) == index.image_size(image_id)
            assert batch["skipped"] == 0
            seen.append(image_id)
    assert sorted(seen) == index.image_ids  # empty images too: validation is kept whole
