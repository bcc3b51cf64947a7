"""Dealing an epoch-based stream's items to ranks x workers, across changes of layout: every
position is consumed exactly once, so every epoch still visits each item once."""

from __future__ import annotations

import random

import pytest

from pretrain.engine.deal import Deal, Lanes, redeal


def _run(deal: Deal, steps: list[int], budget: list[int]) -> list[int]:
    """Each slot takes ``budget[j]`` more steps; returns the positions consumed (steps over
    what earlier layouts took, as the streams do). Mutates ``steps``."""
    consumed = []
    for slot, extra in enumerate(budget):
        for _ in range(extra):
            position = deal.position(slot, steps[slot])
            steps[slot] += 1
            if not deal.taken_earlier(position):
                consumed.append(position)
    return consumed


@pytest.mark.parametrize("layouts", [[4, 2], [4, 6], [4, 1, 3], [2, 3, 5, 1, 4]])
def test_every_position_is_consumed_once_over_changes_of_layout(layouts: list[int]) -> None:
    rng = random.Random(sum(layouts))
    deal, seen, steps = Deal(layouts[0]), [], [0] * layouts[0]
    for index, slots in enumerate(layouts):
        if index:
            deal = redeal(deal, steps, slots)
            assert deal.slots == slots
        steps = [0] * slots
        # slots stop unevenly, as a rank's workers do (about a batch apart)
        seen += _run(deal, steps, [rng.randint(20, 28) for _ in range(slots)])
    assert len(seen) == len(set(seen)), "a position was consumed twice"
    # everything below the final frontier was consumed, nothing was skipped
    frontier = redeal(deal, steps, 1).base
    assert set(range(frontier)) <= set(seen)


def test_an_unchanged_layout_continues_its_lanes() -> None:
    deal = Deal(3)
    assert [deal.position(1, step) for step in range(3)] == [1, 4, 7]
    again = Deal.from_dict(deal.to_dict())
    assert again == deal


def test_records_are_dropped_once_the_frontier_passes_them() -> None:
    # slot 0 took 0, 2, .., 10, slot 1 took 1, 3, 5, 7: the frontier is 9, and 10 is taken
    deal = redeal(Deal(2), [6, 4], 3)
    assert deal.base == 9 and deal.earlier == (Lanes(0, (6, 4)),)
    assert deal.taken_earlier(8) and deal.taken_earlier(10)
    assert not deal.taken_earlier(9) and not deal.taken_earlier(11)
    later = redeal(deal, [3, 3, 3], 2)
    assert later.earlier == () and later.base == 18
    assert Deal.from_dict(later.to_dict()) == later


def test_positions_saved_for_another_layout_are_refused() -> None:
    with pytest.raises(ValueError, match="3 saved slot positions for a deal over 2 slots"):
        redeal(Deal(2), [1, 2, 3], 4)
