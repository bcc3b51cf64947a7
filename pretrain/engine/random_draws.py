"""The seeded randomness of the training streams: an item's seed, the RNGs seeded from it while
the item is augmented, and the draws the folder streams' augmentations make from an explicit
generator.

Every random number a stream's item sees derives from the item's seed (its place in the
stream), never from what the process drew before, so a resumed stream augments every item as an
uninterrupted one does.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


def item_seed(*parts: int) -> int:
    """A seed mixed from integers, e.g. ``(seed, rank, worker, index)`` of an item."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + part) % (2**63)
    return seed


@contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Every RNG an augmentation may draw from, seeded with ``seed`` for the body: torch's CPU
    generator (torchvision, open_clip) and Python's ``random`` (timm's crops and RandAugment).
    Both are put back afterwards, so the caller's own draws (dropout, a main-process loader's
    neighbours) do not depend on the items it augmented."""
    python_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed also queues a CUDA seeding with a
            # formatted stack trace, ~2 ms a sample in a worker (the same CPU numbers).
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            yield
    finally:
        random.setstate(python_state)


def uniform(generator: torch.Generator) -> float:
    """U[0, 1) from ``generator``."""
    return float(torch.rand((), generator=generator))


def randint(generator: torch.Generator, high: int) -> int:
    """An integer of ``[0, high)`` from ``generator``."""
    return int(torch.randint(high, (), generator=generator))


def coin(generator: torch.Generator) -> bool:
    """A fair coin from ``generator``."""
    return randint(generator, 2) == 1


def choice(generator: torch.Generator, values: Sequence[int]) -> int:
    """One of ``values``, uniformly, from ``generator``."""
    return int(values[randint(generator, len(values))])
