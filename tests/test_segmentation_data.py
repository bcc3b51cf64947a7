"""ADE-layout folders: listing, reduce_zero_label, mmseg's training pipeline, the resumable
folder stream (split across ranks and workers, exact resume) and the validation slices."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.segmentation.data import (
    FolderSplit,
    FolderStream,
    LoadPair,
    TrainAugment,
    list_samples,
    reduce_zero_label,
)
from finetune.segmentation.evaluate import ade20k_classes
from finetune.segmentation.synthetic import write_synthetic_ade
from pretrain.engine.stream import StreamState, WorkerPosition

IGNORE = 255


@pytest.fixture(scope="module")
def ade(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_ade(tmp_path_factory.mktemp("ade"), train=24, val=10, num_classes=4)


def _augment(crop: int = 48, cat_max_ratio: float = 0.75) -> TrainAugment:
    return TrainAugment(crop, (128, 64), (0.5, 2.0), cat_max_ratio, 0.5, True,
                        (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), IGNORE)


def test_ade20k_class_names_ship_with_the_package() -> None:
    names = ade20k_classes()
    assert len(names) == 150 == len(set(names))
    assert names[:3] == ["wall", "building", "sky"] and names[-1] == "flag"


def test_reduce_zero_label_ignores_other_and_shifts_the_rest() -> None:
    label = torch.tensor([0, 1, 2, 150, 255])
    assert reduce_zero_label(label, IGNORE).tolist() == [255, 0, 1, 149, 255]


def test_listing_pairs_images_with_annotations(ade: Path, tmp_path: Path) -> None:
    samples = list_samples(ade, "training")
    assert len(samples) == 24
    assert all(image.stem == label.stem for image, label in samples)
    image, label = LoadPair(True, IGNORE)(samples[0])
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    assert image.shape[1] % 32 and image.shape[2] % 32  # sizes are not multiples of 32
    assert set(label.unique().tolist()) <= {0, 1, 2, 3, IGNORE}
    assert (label == IGNORE).any()  # the "other" background
    with pytest.raises(FileNotFoundError, match="no such folder .*images/testing"):
        list_samples(ade, "testing")
    (ade / "annotations" / "training" / f"{samples[3][0].stem}.png").rename(tmp_path / "x.png")
    try:
        with pytest.raises(FileNotFoundError, match="no annotation for 1 of 24 images"):
            list_samples(ade, "training")
    finally:
        (tmp_path / "x.png").rename(ade / "annotations" / "training" / f"{samples[3][0].stem}.png")


def test_training_crops_are_padded_with_the_ignore_index() -> None:
    image = torch.full((3, 20, 30), 100, dtype=torch.uint8)
    label = torch.zeros(20, 30, dtype=torch.long)
    label[:, 15:] = 1
    augment = TrainAugment(64, (30, 20), (1.0, 1.0), 1.0, 0.0, False, (0.5, 0.5, 0.5),
                           (0.25, 0.25, 0.25), IGNORE)
    crop, target = augment(image, label, torch.Generator().manual_seed(0))
    assert crop.shape == (3, 64, 64) and target.shape == (64, 64)
    assert (target[20:] == IGNORE).all() and (target[:, 30:] == IGNORE).all()
    assert (crop[:, 20:] == 0).all()  # padded after normalisation, as mmseg
    assert target[:20, :15].eq(0).all() and target[:20, 15:30].eq(1).all()


def test_crops_are_retried_until_no_class_covers_three_quarters() -> None:
    # a 200x200 label that is class 0 except one 60x60 corner of class 1: most 64x64 crops
    # are all class 0 and get retried
    label = torch.zeros(200, 200, dtype=torch.long)
    label[:60, :60] = 1
    image = torch.zeros(3, 200, 200, dtype=torch.uint8)
    augment = TrainAugment(64, (200, 200), (1.0, 1.0), 0.75, 0.0, False, (0.5,) * 3,
                           (0.25,) * 3, IGNORE)
    unlimited = TrainAugment(64, (200, 200), (1.0, 1.0), 1.0, 0.0, False, (0.5,) * 3,
                             (0.25,) * 3, IGNORE)
    mixed = sum(int(augment(image, label, torch.Generator().manual_seed(s))[1].unique().numel()
                    > 1) for s in range(40))
    plain = sum(int(unlimited(image, label, torch.Generator().manual_seed(s))[1].unique().numel()
                    > 1) for s in range(40))
    assert mixed > plain + 10


def _stream(ade: Path, rank: int, world: int, workers: int, state: StreamState,
            batch: int = 2) -> FolderStream:
    return FolderStream(list_samples(ade, "training"), LoadPair(True, IGNORE), _augment(),
                        batch, seed=3, rank=rank, world_size=world, num_workers=workers,
                        state=state)


def test_stream_splits_every_epoch_between_ranks_and_workers(ade: Path) -> None:
    world, workers = 2, 2
    slots = world * workers
    streams = {(r, w): _stream(ade, r, world, workers, StreamState.fresh(workers))
               for r in range(world) for w in range(workers)}
    seen = []
    for (rank, worker), stream in streams.items():
        slot = rank * workers + worker
        # one epoch is 24 images: 6 items per slot
        seen += [stream.sample_at(n * slots + slot)[0].name for n in range(24 // slots)]
    assert sorted(seen) == sorted(p.name for p, _ in list_samples(ade, "training"))
    # the next epoch is another order
    first = [streams[(0, 0)].sample_at(n)[0] for n in range(24)]
    second = [streams[(0, 0)].sample_at(24 + n)[0] for n in range(24)]
    assert first != second and sorted(first) == sorted(second)


def test_stream_resumes_exactly_from_a_saved_position(ade: Path) -> None:
    batches = iter(_stream(ade, 1, 2, 1, StreamState.fresh(1)))
    run = [next(batches) for _ in range(5)]
    saved = run[2]["position"]
    resumed = iter(_stream(ade, 1, 2, 1, StreamState(micro_batches=3,
                                                      workers=[WorkerPosition(**saved)])))
    for expected in run[3:]:
        got = next(resumed)
        assert torch.equal(got["image"], expected["image"])
        assert torch.equal(got["label"], expected["label"])
        assert got["position"] == expected["position"]
    # another rank sees other crops
    other = next(iter(_stream(ade, 0, 2, 1, StreamState.fresh(1))))
    assert not torch.equal(other["image"], run[0]["image"])


def test_validation_slices_cover_the_split_once(ade: Path) -> None:
    samples = list_samples(ade, "validation")
    seen = []
    for rank in range(2):
        split = FolderSplit(samples, LoadPair(True, IGNORE), (0.5,) * 3, (0.25,) * 3, rank, 2)
        for batch in split:
            image, label = batch["image"], batch["label"]
            assert image.shape[0] == 1 and image.shape[-2:] == label.shape[-2:]
            seen.append(int(batch["index"]))
    assert sorted(seen) == list(range(10))
