"""Pretraining survives what clusters do to it: kills, preemption, bad data, few shards, NaNs.

Every test runs a real two-rank DeepSpeed job (gloo on CPU) with a tiny model.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from data_tools.shard_writer import Sample, write_shard, write_sizes
from data_tools.synthetic import generate
from pretrain.engine.distributed import SHM_DIR, SHM_PREFIX
from pretrain.engine.run_log import read_metrics
from tests.conftest import ROOT, TINY_MODEL, run_deepspeed
from tests.jobs import interrupt_and_resume, logged_step, losses, rank_processes, start, wait_for


def _args(run_dir: Path, shards: str, *extra: str) -> list[str]:
    return ["--config", "demo", "--run-dir", str(run_dir), *TINY_MODEL,
            "--set", f"data.train={shards}", "--set", "data.batch_size=8",
            "--set", "data.shuffle_buffer=32", "--set", "data.shuffle_initial=8",
            "--set", "schedule.warmup_steps=2", "--set", "log.every=1", *extra]


def _shared_memory_segments() -> set[str]:
    return {path.name for path in SHM_DIR.glob(f"{SHM_PREFIX}_*")}


@pytest.mark.parametrize(("stage", "loss"), [
    (1, "siglip"),  # ZeRO-3 trains in the fast suite too (test_finetune_resilience.py)
    pytest.param(3, "clip", marks=pytest.mark.slow),
    pytest.param(0, "clip", marks=pytest.mark.slow)])
def test_zero_stage_trains_and_saves(stage: int, loss: str, shape_shards: dict,
                                     tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_deepspeed("pretrain.py", _args(run_dir, shape_shards["train"],
                                       "--set", f"deepspeed.zero_stage={stage}",
                                       "--set", f"loss.kind={loss}", "--set", "schedule.steps=4"))
    logged = losses(run_dir)
    assert len(logged) == 4 and all(value == value for value in logged.values())
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000004"
    if stage in (0, 3):  # consolidated from ZeRO-3 shards / read from stage 0's whole module
        _export_equals_engine_weights(run_dir, tmp_path / "engine.pt")


def _export_equals_engine_weights(run_dir: Path, gathered: Path) -> None:
    """The export (consolidated from ZeRO-3 shards) holds exactly the weights the live engine
    has after resuming the final checkpoint (gathered from both ranks' partitions)."""
    import subprocess

    import torch

    from pretrain.engine.launcher import deepspeed_command
    from pretrain.export import load_exported_clip

    script = str(ROOT / "tests" / "scripts" / "gather_engine_weights.py")
    command = deepspeed_command("pretrain.py", [str(run_dir), str(gathered)], 2)
    command[command.index(str(ROOT / "launch" / "pretrain.py"))] = script
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "disabled"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    engine = torch.load(gathered, weights_only=True)
    clip, _ = load_exported_clip(run_dir / "export" / "clip.pt")
    exported = dict(clip.named_parameters())
    assert {f"clip.{name}" for name in exported} == set(engine)
    for name, value in exported.items():
        assert torch.equal(value, engine[f"clip.{name}"]), name
    fresh = load_exported_clip(run_dir / "export" / "clip.pt")[0]  # reload is deterministic
    assert all(torch.equal(p, exported[n]) for n, p in fresh.named_parameters())


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
    process = start("pretrain.py", args)
    # killed right after step 4 is logged: two steps and a save away from the next checkpoint
    # (at one thread per rank a tiny step takes well under a second)
    wait_for(lambda: logged_step(interrupted) >= 4, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert (interrupted / "checkpoints" / "latest").read_text() == "step_00000003"
    # DeepSpeed's CPU all-reduce segments (~66 MB of RAM per rank) die with the job
    assert _shared_memory_segments() == segments_before

    run_deepspeed("pretrain.py", args)
    expected, resumed = losses(reference), losses(interrupted)
    assert sorted(resumed) == list(range(1, 9))  # each step logged once
    for step in range(4, 9):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6), step


@pytest.mark.parametrize(("stage", "offload", "how"), [
    # the fast suite's exact-resume check is test_kill_and_resume_reproduces_losses
    pytest.param(3, False, "kill", id="zero3-kill", marks=pytest.mark.slow),
    pytest.param(0, False, "kill", id="zero0-kill", marks=pytest.mark.slow),
    pytest.param(1, False, "kill", id="zero1-kill", marks=pytest.mark.slow),
    pytest.param(2, True, "sigterm", id="zero2-offload-sigterm", marks=pytest.mark.slow),
    pytest.param(3, True, "sigterm", id="zero3-offload-sigterm", marks=pytest.mark.slow),
    pytest.param(1, True, "kill", id="zero1-offload-kill", marks=pytest.mark.slow),
])
def test_resume_is_exact_at_every_zero_stage(stage: int, offload: bool, how: str,
                                             shape_shards: dict, tmp_path: Path) -> None:
    """Interrupted (kill -9 or SIGTERM) and resumed, a run logs the same per-step losses as an
    uninterrupted one, under every ZeRO stage with and without optimizer offload. (ZeRO-3 used
    to die in the first backward after resuming, with DeepSpeed's parameter-trace error.)"""
    common = ["--set", "schedule.steps=8", "--set", "checkpoint.every=2",
              "--set", f"deepspeed.zero_stage={stage}",
              "--set", f"deepspeed.offload_optimizer={str(offload).lower()}",
              "--set", "deepspeed.precision=fp32"]
    reference = tmp_path / "reference"
    run_deepspeed("pretrain.py", _args(reference, shape_shards["train"], *common))
    resumed = tmp_path / "resumed"
    args = _args(resumed, shape_shards["train"], *common)
    output = interrupt_and_resume("pretrain.py", args, resumed, after_step=3, how=how)
    if how == "sigterm":
        assert "pretrain preempted" in output
    expected, got = losses(reference), losses(resumed)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_with_activation_checkpointing_resumes_exactly(stage: int, shape_shards: dict,
                                                           tmp_path: Path) -> None:
    """bf16 on a CPU trains with the math attention kernel (pretrain/engine/attention.py), and
    activation checkpointing recomputes the forward inside the backward: that recompute must
    pick the same kernel. Killed and resumed, the run logs the same losses as an uninterrupted
    one, and the export holds the fp32 master weights (not the engine's bf16 copies)."""
    import torch

    common = ["--set", "schedule.steps=6", "--set", "checkpoint.every=2",
              "--set", f"deepspeed.zero_stage={stage}", "--set", "deepspeed.precision=bf16",
              "--set", "model.image.grad_checkpointing=true",
              "--set", "model.text.grad_checkpointing=true"]
    reference = tmp_path / "reference"
    run_deepspeed("pretrain.py", _args(reference, shape_shards["train"], *common))
    resumed = tmp_path / "resumed"
    interrupt_and_resume("pretrain.py", _args(resumed, shape_shards["train"], *common), resumed,
                         after_step=3, how="kill")
    expected, got = losses(reference), losses(resumed)
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step
    exported = torch.load(resumed / "export" / "clip.pt", weights_only=True)["state_dict"]
    weights = torch.cat([v.flatten() for v in exported.values() if v.is_floating_point()])
    assert weights.dtype == torch.float32
    assert not torch.equal(weights, weights.bfloat16().float())  # fp32 masters, not bf16


@pytest.mark.slow
def test_bf16_stage0_updates_like_zero2(shape_shards: dict, tmp_path: Path) -> None:
    """DeepSpeed's stage-0 bf16 wrapper steps the optimizer once at start-up; the trainer undoes
    that step, so plain data parallelism takes the same updates as ZeRO-2 (it was 1% off after
    the first real update)."""
    common = ["--set", "schedule.steps=4", "--set", "deepspeed.precision=bf16",
              "--set", "optimizer.grad_clip=0"]
    runs = {}
    for stage in (0, 2):
        runs[stage] = tmp_path / f"zero{stage}"
        run_deepspeed("pretrain.py", _args(runs[stage], shape_shards["train"], *common,
                                           "--set", f"deepspeed.zero_stage={stage}"))
    plain, zero2 = losses(runs[0]), losses(runs[2])
    assert sorted(plain) == sorted(zero2) == [1, 2, 3, 4]
    for step in plain:
        assert plain[step] == pytest.approx(zero2[step], rel=2e-3), step


@pytest.mark.slow  # the fast suite signals the whole process group (test_cluster_signals.py)
def test_sigterm_saves_and_exits_cleanly(shape_shards: dict, tmp_path: Path) -> None:
    """SIGTERM to the ranks alone (what srun does with --signal)."""
    run_dir = tmp_path / "run"
    process = start("pretrain.py", _args(run_dir, shape_shards["train"],
                                         "--set", "schedule.steps=500",
                                         "--set", "checkpoint.every=1000"))
    wait_for(lambda: logged_step(run_dir) >= 2, process)
    for rank in rank_processes(process):  # what a scheduler's preemption does
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
