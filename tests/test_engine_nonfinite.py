"""A non-finite micro-batch is replaced, so accumulation boundaries stay on optimizer steps.

The engine below counts micro-steps the way DeepSpeed does (an optimizer step every
``grad_accum`` calls to ``step()``); the two-rank abort path runs for real in
``test_pretrain_resilience.py``.
"""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch

from pretrain.engine.trainer import Trainer, TrainingAborted, _Window


class CountingEngine:
    def __init__(self, grad_accum: int) -> None:
        self.grad_accum = grad_accum
        self.micro_steps = self.global_steps = 0
        self.backward_losses: list[float] = []
        self.losses_per_update: list[list[float]] = []
        self._pending: list[float] = []

    def backward(self, loss: torch.Tensor) -> None:
        self.backward_losses.append(float(loss))
        self._pending.append(float(loss))

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.grad_accum == 0:
            self.global_steps += 1
            self.losses_per_update.append(self._pending)
            self._pending = []


class ScriptedTrainer(Trainer):
    """Only ``train_step``'s collaborators: the 'loss' of a batch is the batch itself, and a
    second part (twice the loss) stands for a task's named loss parts."""

    def __init__(self, losses: list[float], grad_accum: int, max_bad: int = 3) -> None:
        self.cfg = SimpleNamespace(train=SimpleNamespace(grad_accum=grad_accum,
                                                         max_nonfinite_batches=max_bad))
        self.engine = CountingEngine(grad_accum)
        self.loader = iter(losses)
        self.world_size, self.step, self._stop_signal = 1, 0, None
        self.nonfinite_batches = self.nonfinite_in_a_row = 0
        self.attention = contextlib.nullcontext  # PyTorch's own kernel choice

    def forward(self, batch: float) -> dict[str, torch.Tensor]:
        return {"loss": torch.tensor(batch), "double": torch.tensor(2 * batch)}


def _step(trainer: ScriptedTrainer) -> tuple[float, dict[str, float], bool]:
    loss, parts, stop = trainer.train_step(_Window())
    return float(loss), {name: float(value) for name, value in parts.items()}, stop


def test_nonfinite_micro_batch_is_replaced_within_the_step() -> None:
    trainer = ScriptedTrainer([1.0, math.nan, 2.0, 3.0, math.inf, 4.0], grad_accum=2)
    steps = [_step(trainer) for _ in range(2)]
    assert [loss for loss, _, _ in steps] == [1.5, 3.5]
    # named parts are averaged over the same finite micro-batches as the loss
    assert [parts for _, parts, _ in steps] == [{"double": 3.0}, {"double": 7.0}]
    # every optimizer step averaged exactly two finite micro-batches, in stream order
    assert trainer.engine.global_steps == 2
    assert trainer.engine.losses_per_update == [[1.0, 2.0], [3.0, 4.0]]
    assert trainer.nonfinite_batches == 2


def test_nonfinite_batches_in_a_row_abort_and_never_reach_backward() -> None:
    trainer = ScriptedTrainer([1.0, 2.0, math.nan, 5.0, math.nan, math.nan, math.nan],
                              grad_accum=2, max_bad=3)
    assert _step(trainer) == (1.5, {"double": 3.0}, False)
    trainer.step = 1
    with pytest.raises(TrainingAborted, match="3 non-finite losses in a row at step 2"):
        trainer.train_step(_Window())  # a finite batch between NaNs resets the count
    assert trainer.engine.backward_losses == [1.0, 2.0, 5.0]
    assert trainer.nonfinite_batches == 4


def test_preemption_signal_finishes_the_step_then_stops() -> None:
    trainer = ScriptedTrainer([1.0, 2.0, 3.0], grad_accum=2)
    trainer._stop_signal = 15
    assert _step(trainer) == (1.5, {"double": 3.0}, True)
    assert trainer.engine.global_steps == 1
