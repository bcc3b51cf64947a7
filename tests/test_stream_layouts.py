"""The data position under a new layout (ranks x data workers), and resuming in constant time.

Epoch-based streams continue the same global permutation, so every item of the epoch is read
once across the change; the shard stream continues each old worker's stream on the slot of
the same number, exactly; and a shard stream resumed late in its run reads no more shards
than one resumed early (only those its shuffle buffer still holds)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_data_helpers import gradient_jpeg

import pretrain.engine.shard_stream as shard_stream
from data_tools.imagefolder import scan_imagefolder
from data_tools.imagefolder_synthetic import write_synthetic_imagefolder
from data_tools.mixture import load_mixture
from data_tools.shard_writer import Sample, write_shard, write_sizes
from finetune.classification.data import collate_labelled
from finetune.classification.imagefolder import ImageFolderStream
from pretrain.engine.shard_stream import ShardStream
from pretrain.engine.stream import StreamState, TrainLoader, WorkerPosition


def _saved(state: StreamState) -> dict[str, Any]:
    """What a checkpoint keeps of a state (through JSON: nothing may depend on tuples)."""
    return json.loads(json.dumps(state.to_dict()))


# ---------------------------------------------------------------- epoch-based: ImageFolder
@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("layouts") / "train"
    write_synthetic_imagefolder(root, num_classes=4, per_class=15, seed=0, image_size=16)
    return root


def _folder_stream(folder: Path, rank: int, ranks: int, workers: int,
                   state: StreamState) -> ImageFolderStream:
    return ImageFolderStream(scan_imagefolder(folder), lambda image: image, collate_labelled,
                             batch_size=4, seed=7, rank=rank, world_size=ranks,
                             num_workers=workers, state=state)


def _take(stream: ImageFolderStream, worker: int, count: int) -> list[tuple[int, int]]:
    """``count`` items of a logical worker, advancing its position as batches would: each as
    (its place in the endless sequence of epochs, its image)."""
    start = stream.state.workers[worker]
    items = list(itertools.islice(stream.items(worker, start.consumed), count))
    if items:
        stream.state.workers[worker] = WorkerPosition(consumed=items[-1].consumed)
    return [(stream.dealt(worker, item.consumed - 1), item.source) for item in items]


@pytest.mark.parametrize(("old", "new"), [((2, 2), (1, 1)), ((2, 2), (3, 1)), ((2, 1), (2, 2)),
                                          ((3, 2), (2, 3))])
def test_an_epoch_continues_on_another_layout_reading_every_image_once(
        folder: Path, old: tuple[int, int], new: tuple[int, int]) -> None:
    images = len(scan_imagefolder(folder))
    seen: list[tuple[int, int]] = []
    saved = []
    for rank in range(old[0]):
        stream = _folder_stream(folder, rank, *old, StreamState.fresh(old[1]))
        for worker in range(old[1]):  # workers stop unevenly, as they do between batches
            seen += _take(stream, worker, 4 + 3 * ((rank + worker) % 2))
        saved.append(_saved(stream.state))
    streams = [_folder_stream(folder, rank, *new, StreamState.on_new_layout(saved))
               for rank in range(new[0])]
    for stream in streams:
        assert stream.state.micro_batches == 0 and len(stream.state.workers) == new[1]
    while min(place for place, _ in seen[-len(streams) * new[1]:]) < images:
        for stream, worker in itertools.product(streams, range(new[1])):
            seen += _take(stream, worker, 1)
    places = [place for place, _ in seen]
    assert len(places) == len(set(places)), "a place in the sequence was read twice"
    epoch = sorted((place, image) for place, image in seen if place < images)
    assert [place for place, _ in epoch] == list(range(images)), "a place was never read"
    assert sorted(image for _, image in epoch) == list(range(images))  # each image once
    # and a resume of the new layout on itself continues its deal exactly
    stream = streams[0]
    again = _folder_stream(folder, 0, *new, StreamState.from_dict(_saved(stream.state)))
    assert _take(again, 0, 5) == _take(stream, 0, 5)


# ---------------------------------------------------------------- the shard stream
def _shards(folder: Path, shards: int = 12, per_shard: int = 10) -> str:
    for shard in range(shards):
        write_shard(folder, shard, [Sample(gradient_jpeg((8, 8), seed=shard * per_shard + i),
                                           f"shard {shard} sample {i}")
                                    for i in range(per_shard)])
    write_sizes(folder)
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


def _caption(sample: dict[str, Any]) -> tuple[str]:
    return (sample["txt"].decode(),)


def _captions(items: list[tuple[str]]) -> dict[str, Any]:
    return {"captions": [caption for (caption,) in items], "size": torch.tensor(len(items))}


def _shard_loader(pattern: str, state: StreamState, rank: int = 0) -> TrainLoader:
    stream = ShardStream(load_mixture(pattern), _caption, _captions, batch_size=3, seed=1,
                         rank=rank, num_workers=0, shuffle_buffer=15, shuffle_initial=5,
                         state=state)
    return TrainLoader(stream, 0)


def _batches(loader: TrainLoader, count: int) -> list[list[str]]:
    return [next(loader)["captions"] for _ in range(count)]


def test_a_late_resume_reads_no_more_shards_than_an_early_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pattern = _shards(tmp_path)
    straight = _shard_loader(pattern, StreamState.fresh(0))
    expected = _batches(straight, 130)
    opened: list[str] = []
    real_open = shard_stream.open_shard
    monkeypatch.setattr(shard_stream, "open_shard",
                        lambda url, policy: opened.append(url) or real_open(url, policy))
    opens = {}
    for stop in (5, 120):  # 15 and 360 samples consumed: 1.5 and 36 shards' worth
        first = _shard_loader(pattern, StreamState.fresh(0))
        _batches(first, stop)
        opened.clear()
        resumed = _shard_loader(pattern, StreamState.from_dict(_saved(first.state)))
        assert _batches(resumed, 10) == expected[stop:stop + 10]
        opens[stop] = len(opened)
    # re-read: the shards the 15 buffered samples came from (a few) and the 3 that the next 30
    # samples need; a replay would open all 36 before the first batch, and 39 in all
    assert opens[5] <= 10 and opens[120] <= 10


def test_a_shard_stream_continues_each_old_worker_on_the_slot_of_its_number(
        tmp_path: Path) -> None:
    pattern = _shards(tmp_path)
    old = [_shard_loader(pattern, StreamState.fresh(0), rank=rank) for rank in range(2)]
    continued = [_batches(loader, 6)[3:] for loader in old]  # what 3 more batches would be
    old = [_shard_loader(pattern, StreamState.fresh(0), rank=rank) for rank in range(2)]
    for loader in old:
        _batches(loader, 3)
    saved = [_saved(loader.state) for loader in old]
    new = [_shard_loader(pattern, StreamState.on_new_layout(saved), rank=rank)
           for rank in range(3)]
    assert [_batches(loader, 3) for loader in new[:2]] == continued
    fresh = _batches(new[2], 3)  # a stream of its own, unlike any old one's
    assert fresh not in continued and fresh != _batches(
        _shard_loader(pattern, StreamState.fresh(0), rank=2), 3)
    # the carried streams keep their seeds when the new layout resumes on itself
    again = _shard_loader(pattern, StreamState.from_dict(_saved(new[1].state)), rank=1)
    assert _batches(again, 2) == _batches(new[1], 2)
