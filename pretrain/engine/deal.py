"""How an epoch-based stream deals its items to ranks x workers, and how the deal carries over
to another layout without reading any item twice.

The items of the endless concatenation of epochs have global positions 0, 1, 2, ... (position
``p`` is item ``permutation_e[p mod n]`` of epoch ``e = p // n``). A deal over ``slots`` slots
(ranks x data workers) gives slot ``j`` the lane ``base + j + i * slots`` for steps
``i = 0, 1, ...``; a slot's saved position is its step count. Within one layout the lanes are
disjoint, so every position is read once.

When the layout changes (a resume on other ranks or workers), the old slots stopped at
different steps (a rank's workers hand out batches in turn, so they differ by about a batch).
:func:`redeal` starts a new deal at the *frontier*, the least position some old slot had not
reached: everything below it was consumed. The old lanes' positions at or above the frontier
(a ragged band about one batch per slot deep) are kept as :class:`Lanes` records, and the new
slots step over them. Every position is therefore consumed exactly once, over any number of
layout changes, and each epoch still visits every item once. A record is dropped once the
frontier has passed its last position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Lanes:
    """What one layout consumed: slot ``j`` took ``base + j + i * len(steps)`` for
    ``i < steps[j]``."""

    base: int
    steps: tuple[int, ...]

    def covers(self, position: int) -> bool:
        offset = position - self.base
        if offset < 0:
            return False
        step, slot = divmod(offset, len(self.steps))
        return step < self.steps[slot]

    def end(self) -> int:
        """The position after the last one consumed."""
        slots = len(self.steps)
        last = [self.base + j + (s - 1) * slots for j, s in enumerate(self.steps) if s]
        return max(last) + 1 if last else self.base


@dataclass(frozen=True)
class Deal:
    """The current deal: ``slots`` lanes from ``base``, skipping what earlier layouts took."""

    slots: int
    base: int = 0  # every position below it was consumed by earlier layouts
    earlier: tuple[Lanes, ...] = field(default_factory=tuple)

    def position(self, slot: int, step: int) -> int:
        return self.base + slot + step * self.slots

    def taken_earlier(self, position: int) -> bool:
        """Whether an earlier layout consumed ``position`` (the lane steps over it)."""
        return position < self.base or any(lanes.covers(position) for lanes in self.earlier)

    def to_dict(self) -> dict[str, Any]:
        return {"slots": self.slots, "base": self.base,
                "earlier": [{"base": lanes.base, "steps": list(lanes.steps)}
                            for lanes in self.earlier]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Deal:
        earlier = tuple(Lanes(int(e["base"]), tuple(int(s) for s in e["steps"]))
                        for e in data.get("earlier", ()))
        return cls(int(data["slots"]), int(data.get("base", 0)), earlier)


def redeal(deal: Deal, steps: list[int], slots: int) -> Deal:
    """The deal over ``slots`` new slots that continues ``deal``, whose slots stopped after
    ``steps[j]`` steps each (see the module docstring)."""
    if len(steps) != deal.slots:
        raise ValueError(f"{len(steps)} saved slot positions for a deal over {deal.slots} slots")
    consumed = Lanes(deal.base, tuple(steps))
    # below the frontier every lane had passed; above it, only what a record covers was read
    frontier = min(deal.position(j, s) for j, s in enumerate(steps))
    records = (*deal.earlier, consumed)
    while any(lanes.covers(frontier) for lanes in records):
        frontier += 1
    return Deal(slots, frontier, tuple(r for r in records if r.end() > frontier))
