"""ImageFolder data: listing, the resumable training stream, validation slices, and the
conversion to labelled shards."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch

from data_tools.imagefolder import imagefolder_to_shards, read_classes, scan_imagefolder
from data_tools.imagefolder_synthetic import write_synthetic_imagefolder
from finetune.classification.data import collate_labelled
from finetune.classification.imagefolder import ImageFolderSplit, ImageFolderStream
from pretrain.engine.stream import StreamState, TrainLoader


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imagefolder") / "train"
    write_synthetic_imagefolder(root, num_classes=3, per_class=6, seed=0, image_size=32,
                                corrupt=1, png_named_jpeg=1)
    return root


def _to_tensor(image) -> torch.Tensor:  # noqa: ANN001 (a PIL image)
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(image.resize((16, 16)))


def test_scan_lists_classes_in_wnid_order(folder: Path) -> None:
    index = scan_imagefolder(folder)
    assert index.classes == ["n01440764", "n01443537", "n01484850"]
    assert len(index) == 20  # 18 images, the corrupt one and the PNG named .JPEG
    assert index.labels.tolist().count(0) == 7 and index.labels.tolist().count(1) == 7
    assert index.path(0).parent.name == "n01440764"
    with pytest.raises(ValueError, match="not among the 2 classes"):
        scan_imagefolder(folder, classes=["n01440764", "n01443537"])
    with pytest.raises(FileNotFoundError, match="no such image folder"):
        scan_imagefolder(folder / "missing")


def test_every_image_once_per_epoch_across_ranks_and_workers(folder: Path) -> None:
    index = scan_imagefolder(folder)
    seen = []
    for rank in range(2):
        stream = ImageFolderStream(index, _to_tensor, collate_labelled, 2, seed=1, rank=rank,
                                   world_size=2, num_workers=2, state=StreamState.fresh(2))
        seen += [stream.image_at(stream.dealt(worker, n)) for worker in range(2) for n in range(5)]
    assert sorted(seen) == list(range(20))  # 2 ranks x 2 workers x 5 items = one epoch
    # the next epoch is another permutation
    stream = ImageFolderStream(index, _to_tensor, collate_labelled, 2, seed=1, rank=0,
                               world_size=1, num_workers=1, state=StreamState.fresh(1))
    order = [stream.image_at(stream.dealt(0, n)) for n in range(40)]
    assert order[:20] != order[20:]


def _batches(index, state: StreamState, count: int, workers: int) -> list[dict]:  # noqa: ANN001
    stream = ImageFolderStream(index, _to_tensor, collate_labelled, 3, seed=4, rank=1,
                               world_size=2, num_workers=workers, state=state)
    loader = TrainLoader(stream, workers)
    try:
        return [next(loader) for _ in range(count)]
    finally:
        loader.close()


def test_resume_continues_with_the_same_batches_and_counts_the_corrupt_file(folder: Path
                                                                            ) -> None:
    index = scan_imagefolder(folder)
    reference = _batches(index, StreamState.fresh(2), 9, workers=2)
    state = StreamState.fresh(2)
    _batches(index, state, 4, workers=2)
    resumed = StreamState.from_dict(state.to_dict())
    rest = _batches(index, resumed, 5, workers=2)
    for expected, got in zip(reference[4:], rest, strict=True):
        assert torch.equal(expected["image"], got["image"])
        assert torch.equal(expected["label"], got["label"])
    # 9 batches of 3 on rank 1 of 2 read 27+ of the 40 items of two epochs; the corrupt file
    # is in rank 1's share of one epoch or the other (or both), and is skipped, counted
    assert resumed.skipped >= 1


def test_validation_slices_cover_the_folder_once(folder: Path) -> None:
    index = scan_imagefolder(folder)
    labels, skipped = [], 0
    for rank in range(2):
        for batch in ImageFolderSplit(index, _to_tensor, collate_labelled, 4, rank, 2):
            labels += batch["label"].tolist()
            skipped += batch["skipped"]
    assert skipped == 1 and len(labels) == 19
    # every readable image once: class 0 lost its corrupt file
    assert [labels.count(c) for c in range(3)] == [6, 7, 6]


def test_folder_to_labelled_shards(folder: Path, tmp_path: Path) -> None:
    summary = imagefolder_to_shards(folder, tmp_path / "shards", samples_per_shard=8)
    assert summary["samples"] == 19 and summary["skipped"] == {"truncated_image": 1}
    assert summary["shards"].endswith("{00000..00002}.tar") and summary["classes"] == 3
    assert read_classes(tmp_path / "shards") == scan_imagefolder(folder).classes
    names = json.loads((tmp_path / "shards" / "classes.json").read_text())["names"]
    assert names[0] == "tench"
    metas = []
    for shard in sorted((tmp_path / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = tar.getnames()
            assert all(not m.endswith(".png") for m in members)  # the PNG became a JPEG
            metas += [json.load(tar.extractfile(m)) for m in members if m.endswith(".json")]
    assert sorted(m["cls"] for m in metas) == [0] * 6 + [1] * 7 + [2] * 6
    assert all(m["wnid"] == read_classes(tmp_path / "shards")[m["cls"]] for m in metas)
    # classes mixed across shards (a stream reads a few shards at a time)
    assert len({m["cls"] for m in metas[:8]}) > 1
    # an interrupted conversion keeps its finished shards: running again changes nothing
    before = (tmp_path / "shards" / "00000.tar").stat().st_mtime_ns
    assert imagefolder_to_shards(folder, tmp_path / "shards", samples_per_shard=8) == summary
    assert (tmp_path / "shards" / "00000.tar").stat().st_mtime_ns == before


def test_command_line(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from data_tools.imagefolder_shards import main

    assert main(["--input", str(folder), "--output", str(tmp_path / "s")]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 19
    with pytest.raises(SystemExit) as exit_info:
        main(["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "t")])
    assert exit_info.value.code == 2
    assert "no such image folder" in capsys.readouterr().err


def test_a_folder_of_undecodable_files_ends_the_run_in_one_line(tmp_path: Path) -> None:
    from pretrain.engine.errors import TrainingAborted

    for wnid in ("n01440764", "n01443537"):
        (tmp_path / wnid).mkdir()
        for n in range(3):
            (tmp_path / wnid / f"{n}.JPEG").write_bytes(b"<html>not an image</html>")
    index = scan_imagefolder(tmp_path)
    stream = ImageFolderStream(index, _to_tensor, collate_labelled, 2, seed=0, rank=0,
                               world_size=1, num_workers=1, state=StreamState.fresh(1))
    loader = TrainLoader(stream, 0)
    with pytest.raises(TrainingAborted, match="the last 6 images read all failed to decode"):
        next(loader)
