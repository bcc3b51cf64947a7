"""Validation slices: every sample exactly once across ranks and workers, bad samples counted
wherever they fall (also after a slice's last full batch)."""

from __future__ import annotations

from pathlib import Path

from data_tools.shard_writer import Sample, write_shard
from data_tools.synthetic import generate
from pretrain.engine.eval_slices import SlicedSplit
from pretrain.engine.images import decode_image


def _split(directory: Path) -> str:
    good = list(generate(8, seed=3, image_size=16))
    bad = [Sample(image=b"not an image", caption="broken")] * 3
    write_shard(directory, 0, good + bad)  # the corrupt samples come last
    return str(directory / "00000.tar")


def _collate(items: list) -> dict:
    return {"keys": [key for key, _ in items]}


def _decode(sample: dict) -> tuple:
    decode_image(sample)  # raises on the corrupt ones
    return sample["__key__"], None


def test_slices_partition_the_split_and_count_every_bad_sample(tmp_path: Path) -> None:
    pattern = _split(tmp_path)
    seen, skipped = [], 0
    for rank in range(2):
        split = SlicedSplit(pattern, _decode, _collate, batch_size=2, rank=rank, world_size=2)
        for batch in split:
            seen += batch["keys"]
            skipped += batch["skipped"]
    assert len(seen) == len(set(seen)) == 8
    assert skipped == 3  # rank 0 meets 2 of them, rank 1 one, all after their last full batch


def test_limit_keeps_the_first_samples_only(tmp_path: Path) -> None:
    split = SlicedSplit(_split(tmp_path), _decode, _collate, batch_size=4, rank=0,
                        world_size=1, limit=5)
    assert sum(len(b["keys"]) for b in split) == 5
