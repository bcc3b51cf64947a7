"""Pretraining survives what clusters do to it: kills, preemption, bad data, few shards, NaNs.

Every test runs a real two-rank DeepSpeed job (gloo on CPU) with a tiny model.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from data_tools.shard_writer import Sample, write_shard, write_sizes
from data_tools.synthetic import generate
from pretrain.distributed import SHM_DIR, SHM_PREFIX
from pretrain.launcher import deepspeed_command
from pretrain.metrics import read_metrics
from tests.conftest import ROOT, TINY_MODEL, run_deepspeed


def _args(run_dir: Path, shards: str, *extra: str) -> list[str]:
    return ["--config", "demo", "--run-dir", str(run_dir), *TINY_MODEL,
            "--set", f"data.train={shards}", "--set", "data.batch_size=8",
            "--set", "data.shuffle_buffer=32", "--set", "data.shuffle_initial=8",
            "--set", "schedule.warmup_steps=2", "--set", "log.every=1", *extra]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}


def _start(run_dir: Path, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "disabled"}
    return subprocess.Popen(
        deepspeed_command("pretrain.py", args, ranks=2), cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)


def _wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"run ended early:\n{process.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.2)


def _logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    records = read_metrics(path) if path.exists() else []
    return records[-1]["step"] if records else 0


def _shared_memory_segments() -> set[str]:
    return {path.name for path in SHM_DIR.glob(f"{SHM_PREFIX}_*")}


def _rank_processes(launcher: subprocess.Popen) -> list[psutil.Process]:
    children = psutil.Process(launcher.pid).children(recursive=True)
    return [p for p in children if "--local_rank" in " ".join(p.cmdline())]


@pytest.mark.parametrize(("stage", "loss"), [(1, "siglip"), (3, "clip")])
def test_zero_stage_trains_and_saves(stage: int, loss: str, shape_shards: dict,
                                     tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_deepspeed("pretrain.py", _args(run_dir, shape_shards["train"],
                                       "--set", f"deepspeed.zero_stage={stage}",
                                       "--set", f"loss.kind={loss}", "--set", "schedule.steps=4"))
    losses = _losses(run_dir)
    assert len(losses) == 4 and all(value == value for value in losses.values())
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000004"
    assert (run_dir / "export" / "encoder.pt").is_file()


def test_kill_and_resume_reproduces_losses(shape_shards: dict, tmp_path: Path) -> None:
    """kill -9 mid-run, re-run the same command: every step after the checkpoint has the same
    loss as in an uninterrupted run (fp32; two data workers per rank, so the resumed stream
    must also restore which worker serves the next batch)."""
    common = ["--set", "schedule.steps=8", "--set", "checkpoint.every=3",
              "--set", "data.workers=2", "--set", "deepspeed.precision=fp32"]
    reference = tmp_path / "reference"
    run_deepspeed("pretrain.py", _args(reference, shape_shards["train"], *common))

    interrupted = tmp_path / "interrupted"
    args = _args(interrupted, shape_shards["train"], *common)
    segments_before = _shared_memory_segments()
    process = _start(interrupted, args)
    _wait_for(lambda: _logged_step(interrupted) >= 5, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert (interrupted / "checkpoints" / "latest").read_text() == "step_00000003"
    # DeepSpeed's CPU all-reduce segments (~66 MB of RAM per rank) die with the job
    assert _shared_memory_segments() == segments_before

    run_deepspeed("pretrain.py", args)
    expected, resumed = _losses(reference), _losses(interrupted)
    assert sorted(resumed) == list(range(1, 9))  # each step logged once
    for step in range(4, 9):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6), step


def test_sigterm_saves_and_exits_cleanly(shape_shards: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    process = _start(run_dir, _args(run_dir, shape_shards["train"], "--set", "schedule.steps=500",
                                    "--set", "checkpoint.every=1000"))
    _wait_for(lambda: _logged_step(run_dir) >= 2, process)
    for rank in _rank_processes(process):  # what a scheduler's preemption does
        rank.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-3000:]
    assert "pretrain preempted" in output
    tag = (run_dir / "checkpoints" / "latest").read_text()
    assert int(tag.removeprefix("step_")) >= 2
    assert not (run_dir / "export").exists()  # unfinished runs are not exported


def _corrupt_shards(directory: Path) -> str:
    """One shard: 24 good samples and 8 whose image bytes are text or truncated JPEG."""
    good = list(generate(24, seed=9, image_size=32))
    bad = [Sample(image=b"<html>not an image</html>", caption="a page saved as .jpg")] * 4
    bad += [Sample(image=s.image[: len(s.image) // 3], caption=s.caption) for s in good[:4]]
    write_shard(directory, 0, good[:12] + bad + good[12:])
    write_sizes(directory)
    return str(directory / "00000.tar")


def test_corrupt_samples_are_skipped_and_counted_with_fewer_shards_than_workers(
        tmp_path: Path) -> None:
    """One shard for 2 ranks x 2 workers: no hang; corrupt samples skipped and counted."""
    run_dir = tmp_path / "run"
    run_deepspeed("pretrain.py", _args(run_dir, _corrupt_shards(tmp_path / "shards"),
                                       "--set", "data.workers=2", "--set", "schedule.steps=6"),
                  timeout=300)
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 7))
    assert records[-1]["skipped_samples"] > 0
    assert all(r["loss"] == r["loss"] for r in records)  # finite, not NaN


def test_nonfinite_losses_abort_without_damaging_checkpoints(shape_shards: dict,
                                                             tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_deepspeed("pretrain.py", _args(
        run_dir, shape_shards["train"], "--set", "schedule.steps=40", "--set", "optimizer.lr=1e9",
        "--set", "schedule.warmup_steps=0", "--set", "train.max_nonfinite_batches=2",
        "--set", "checkpoint.every=1", "--set", "deepspeed.precision=fp32"), check=False)
    assert result.returncode != 0
    assert "2 non-finite losses in a row" in result.stderr + result.stdout
    latest = (run_dir / "checkpoints" / "latest").read_text()
    # the checkpoint `latest` names is complete and loadable
    import torch

    rank_state = torch.load(run_dir / "checkpoints" / latest / "rank_00001.pt",
                            weights_only=True)
    assert rank_state["data"]["micro_batches"] == int(latest.removeprefix("step_"))
