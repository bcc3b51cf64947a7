"""The resumable shuffle buffer picks what webdataset's shuffle picks, and a buffer restored
from its saved contents continues exactly."""

from __future__ import annotations

import itertools
import random

import pytest
import webdataset as wds

from pretrain.engine.shuffle import ShuffleBuffer, shuffled


@pytest.mark.parametrize(("size", "initial", "count"), [(10, 3, 100), (50, 50, 40), (7, 20, 30)])
def test_picks_what_webdataset_picks(size: int, initial: int, count: int) -> None:
    theirs = list(wds.shuffle(size, initial, rng=random.Random(5))(iter(range(count))))
    ours = list(shuffled(iter(range(count)), ShuffleBuffer(size, initial, random.Random(5))))
    assert ours == theirs


def test_a_restored_buffer_continues_exactly() -> None:
    uninterrupted = list(itertools.islice(
        shuffled(iter(range(10_000)), ShuffleBuffer(100, 30, random.Random(1))), 500))
    source = iter(range(10_000))
    buffer = ShuffleBuffer(100, 30, random.Random(1))
    first = list(itertools.islice(shuffled(source, buffer), 200))
    # what a checkpoint keeps: the buffer's contents, the generator and the input position
    saved_items, saved_rng, read = list(buffer.items), buffer.rng.getstate(), next(source)
    rng = random.Random()
    rng.setstate(saved_rng)
    restored = ShuffleBuffer(100, 30, rng, saved_items)
    rest = list(itertools.islice(shuffled(iter(range(read, 10_000)), restored), 300))
    assert first + rest == uninterrupted
