"""Helpers for tests that start, watch, interrupt and resume real multi-rank DeepSpeed jobs."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from pretrain.engine.launcher import deepspeed_command
from pretrain.engine.run_log import read_metrics
from tests.conftest import ROOT, run_deepspeed

# A fine-tuning job's encoder trained from scratch (no pretraining run needed), as --set args.
TINY_ENCODER = [
    "--set", "encoder.weights=null", "--set", "encoder.name=davit_tiny",
    "--set", "encoder.overrides={depths: [1, 1, 1, 1], embed_dims: [16, 32, 48, 64], "
             "num_heads: [1, 1, 1, 2]}",
]


def start(script: str, args: list[str], ranks: int = 2,
          env: dict[str, str] | None = None) -> subprocess.Popen:
    """Launch a job in its own process group (so a test can kill all of it); ``env`` adds to
    or overrides the environment (wandb is disabled unless it says otherwise)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.Popen(
        deepspeed_command(script, args, ranks=ranks), cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(condition: Callable[[], bool], process: subprocess.Popen,
             timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"run ended early:\n{process.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.2)


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return read_metrics(path) if path.exists() else []


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def logged_step(run_dir: Path) -> int:
    steps = [r["step"] for r in records(run_dir) if "loss" in r]
    return steps[-1] if steps else 0


def rank_processes(launcher: subprocess.Popen) -> list[psutil.Process]:
    children = psutil.Process(launcher.pid).children(recursive=True)
    return [p for p in children if "--local_rank" in " ".join(p.cmdline())]


def interrupt_and_resume(script: str, args: list[str], run_dir: Path, after_step: int,
                         how: str) -> str:
    """Run ``args`` until ``after_step`` is logged, interrupt it (``"kill"``: kill -9 of the
    whole job; ``"sigterm"``: SIGTERM to every rank, as a scheduler's preemption), then run the
    same command to the end. Returns the output of the interrupted run."""
    process = start(script, args)
    wait_for(lambda: logged_step(run_dir) >= after_step, process)
    if how == "kill":
        os.killpg(process.pid, signal.SIGKILL)
        output = process.communicate()[0]
    else:
        for rank in rank_processes(process):
            rank.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=180)[0]
        assert process.returncode == 0, output[-3000:]
    run_deepspeed(script, args)
    return output
