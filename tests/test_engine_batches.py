"""Batches reach the engine's device whole: nested per-image targets move too, and only the
task's input tensors take the compute dtype (targets keep their precision)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from pretrain.engine.task import move_to_device
from pretrain.engine.trainer import Trainer


def test_nested_targets_move_and_keep_their_dtype() -> None:
    boxes = [torch.rand(3, 4), torch.rand(0, 4)]  # per image, different sizes
    batch = {"image": torch.rand(2, 3, 8, 8), "label": torch.tensor([1, 2]),
             "targets": [{"boxes": b, "labels": torch.ones(len(b), dtype=torch.long)}
                         for b in boxes], "keys": ["a", "b"], "skipped": 0}
    trainer = object.__new__(Trainer)  # only to_device's collaborators
    trainer.device, trainer.dtype = torch.device("cpu"), torch.bfloat16
    trainer.task = SimpleNamespace(input_keys=("image",))
    moved = trainer.to_device(batch)
    assert moved["image"].dtype == torch.bfloat16
    assert moved["label"].dtype == torch.long
    assert [t["boxes"].dtype for t in moved["targets"]] == [torch.float32, torch.float32]
    assert [t["boxes"].shape[0] for t in moved["targets"]] == [3, 0]
    assert torch.equal(moved["targets"][0]["boxes"], boxes[0])
    assert moved["keys"] == ["a", "b"] and moved["skipped"] == 0


def test_move_to_device_casts_only_floating_tensors() -> None:
    moved = move_to_device((torch.zeros(2), torch.zeros(2, dtype=torch.long)), torch.device("cpu"),
                           torch.float16)
    assert isinstance(moved, tuple)
    assert (moved[0].dtype, moved[1].dtype) == (torch.float16, torch.long)
