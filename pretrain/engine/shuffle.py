"""webdataset's shuffle buffer, with contents a checkpoint can hold.

:func:`shuffled` picks exactly what ``webdataset.shuffle(size, initial, rng=rng)`` picks from
the same input and generator (the same algorithm: while the buffer is below ``size`` it takes
two input samples per pick, and picks once it holds ``initial``), but keeps its buffer in a
:class:`ShuffleBuffer` that the caller can read between picks. A stream saves what the buffer
holds (references to samples, not the samples) and the generator's state, and a resumed stream
refills the buffer from those references instead of replaying everything it consumed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ShuffleBuffer:
    size: int
    initial: int
    rng: random.Random
    items: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.initial = min(self.initial, self.size)

    def pick(self) -> Any:
        index = self.rng.randint(0, len(self.items) - 1)
        item = self.items[index]
        self.items[index] = self.items[-1]
        self.items.pop()
        return item


def shuffled(samples: Iterator[Any], buffer: ShuffleBuffer) -> Iterator[Any]:
    """``samples`` in the order webdataset's shuffle gives them (see the module docstring),
    starting from whatever ``buffer`` already holds."""
    for sample in samples:
        buffer.items.append(sample)
        if len(buffer.items) < buffer.size:
            following = next(samples, None)
            if following is not None:
                buffer.items.append(following)
        if len(buffer.items) >= buffer.initial:
            yield buffer.pick()
    while buffer.items:
        yield buffer.pick()
