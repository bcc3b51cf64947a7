"""Fine-tuning through the shared trainer survives kill -9 like pretraining: the resumed run
repeats the uninterrupted run's per-step losses and evaluations exactly, under ZeRO-3, with a
validation split that does not divide evenly between the ranks."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_tools.synthetic import COLORS, write_synthetic_shards
from tests.conftest import run_deepspeed
from tests.jobs import interrupt_and_resume, losses, records

ENCODER = [  # trained from scratch: the test needs no pretraining run
    "--set", "encoder.weights=null", "--set", "encoder.name=davit_tiny",
    # stochastic depth draws from the global RNG every step: a resumed run must draw the same
    "--set", "encoder.drop_path=0.1",
    "--set", "encoder.overrides={depths: [1, 1, 1, 1], embed_dims: [16, 32, 48, 64], "
             "num_heads: [1, 1, 1, 2]}",
]


def _args(run_dir: Path, train: str, val: str) -> list[str]:
    return ["--config", "demo_shapes", "--run-dir", str(run_dir), *ENCODER,
            "--set", f"data.train={train}", "--set", f"data.val={val}",
            "--set", "data.label_key=color", "--set", f"data.classes=[{', '.join(COLORS)}]",
            "--set", "data.num_classes=8", "--set", "data.image_size=32",
            "--set", "data.batch_size=8", "--set", "data.workers=2",
            "--set", "data.shuffle_buffer=32", "--set", "data.shuffle_initial=8",
            "--set", "schedule.steps=8", "--set", "schedule.warmup_steps=2",
            "--set", "eval.every=3", "--set", "eval.batch_size=25",
            "--set", "checkpoint.every=2", "--set", "checkpoint.keep=2",
            "--set", "deepspeed.zero_stage=3", "--set", "log.every=1"]


def _evaluations(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in records(run_dir) if "eval/top1" in r}


def test_finetune_kill_and_resume_is_exact(shape_shards: dict, tmp_path: Path) -> None:
    # 101 images: 51 for rank 0 and 50 for rank 1, so under ZeRO-3 one rank runs out of
    # validation batches first and must keep joining the other's forward passes
    val = write_synthetic_shards(tmp_path / "val", 101, seed=5, samples_per_shard=60,
                                 progress=False)
    reference = tmp_path / "reference"
    run_deepspeed("finetune.py", _args(reference, shape_shards["labelled"], val))
    resumed = tmp_path / "resumed"
    interrupt_and_resume("finetune.py", _args(resumed, shape_shards["labelled"], val), resumed,
                         after_step=5, how="kill")

    expected, got = losses(reference), losses(resumed)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step
    reference_evals, resumed_evals = _evaluations(reference), _evaluations(resumed)
    assert sorted(resumed_evals) == [3, 6, 8]
    for step, record in reference_evals.items():
        assert record["eval/samples"] == 101
        assert resumed_evals[step]["eval/top1"] == record["eval/top1"], step
        assert resumed_evals[step]["eval/best_top1"] == record["eval/best_top1"], step
