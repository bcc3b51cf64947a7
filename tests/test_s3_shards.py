"""Shards on a real S3 API: moto's S3-compatible server on loopback, started here, holding the
test shards with their sizes.json. ``--check``, training, and kill -9 + resume over ``s3://``
behave exactly as over the same files on disk."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pretrain.engine.skipped import read_skipped
from tests.conftest import ROOT, TINY_MODEL
from tests.jobs import logged_step, losses, start, wait_for
from tests.shard_servers import S3Server

BUCKET = "shards"


@pytest.fixture(scope="module")
def s3(shape_shards: dict) -> Iterator[S3Server]:
    with S3Server() as server:
        server.upload(BUCKET, Path(shape_shards["train"]).parent)
        yield server


def _s3_pattern(local_pattern: str) -> str:
    return f"s3://{BUCKET}/{Path(local_pattern).name}"


def _args(run_dir: Path, shards: str) -> list[str]:
    return ["--config", "demo", "--run-dir", str(run_dir), *TINY_MODEL,
            "--set", f"data.train={shards}", "--set", "data.batch_size=8",
            "--set", "data.shuffle_buffer=32", "--set", "data.shuffle_initial=8",
            "--set", "schedule.warmup_steps=2", "--set", "log.every=1",
            "--set", "schedule.steps=8", "--set", "checkpoint.every=3",
            "--set", "data.workers=2", "--set", "deepspeed.precision=fp32"]


def _run(args: list[str], env: dict[str, str]) -> str:
    process = start("pretrain.py", args, env=env)
    try:
        output, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError("the run hung") from None
    assert process.returncode == 0, output[-4000:]
    return output


def test_check_over_s3(s3: S3Server, shape_shards: dict) -> None:
    def check(shards: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config", "demo",
             "--check", "--set", f"data.train={shards}", "--set", "data.remote.retries=0"],
            cwd=ROOT, env={**os.environ, **s3.env}, capture_output=True, text=True,
            timeout=120)

    good = check(_s3_pattern(shape_shards["train"]))
    assert good.returncode == 0, good.stderr[-3000:]
    missing = check(f"s3://{BUCKET}/{{00000..00009}}.tar")  # 4 shards exist, not 10
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"input error: shard set 's3://{BUCKET}/{{00000..00009}}.tar': 2 of 4 probed remote "
        f"shards unusable, e.g. s3://{BUCKET}/00004.tar: S3 NoSuchKey"]  # probed: 0, 2, 4, 6


@pytest.mark.slow  # three 2-rank runs, ~60 s
def test_training_and_kill_resume_over_s3_match_local_files(s3: S3Server, shape_shards: dict,
                                                            tmp_path: Path) -> None:
    """The same run from local files and from s3:// logs the same losses; the s3:// run killed
    with kill -9 right after step 4 and re-run resumes from its step-3 checkpoint and still logs
    exactly the local run's losses."""
    local = tmp_path / "local"
    _run(_args(local, shape_shards["train"]), {})

    remote = tmp_path / "s3"
    args = _args(remote, _s3_pattern(shape_shards["train"]))
    process = start("pretrain.py", args, env=s3.env)
    # two steps and a save away from the step-6 checkpoint (tiny steps take well under a second)
    wait_for(lambda: logged_step(remote) >= 4, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert (remote / "checkpoints" / "latest").read_text() == "step_00000003"
    output = _run(args, s3.env)
    assert "resumed from step_00000003 at step 3" in output

    expected, got = losses(local), losses(remote)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step
    assert read_skipped(remote) == []
