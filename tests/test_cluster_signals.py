"""What clusters do to a running job, done the way they do it: a node that freezes instead of
dying, preemption signalled to every process of the job, a launcher that dies.

Every test runs a real two-rank job (gloo on CPU) with a tiny model, in its own session so that
``os.killpg`` reaches all of it: launcher, ranks, data-loader workers (and wandb's service where
it is in the group).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pretrain.engine.launcher import find_free_port
from pretrain.engine.run_log import read_training_metrics
from tests.conftest import ROOT, TINY_MODEL
from tests.jobs import logged_step, rank_processes, start, wait_for

# The roll call after a timed-out collective waits up to min(timeout, 30 s); DeepSpeed's
# launcher then gives a rank that ignores SIGTERM (a frozen one) 30 s before SIGKILL.
TIMEOUT_S = 6


def _args(run_dir: Path, shards: str, *extra: str) -> list[str]:
    return ["--config", "demo", "--run-dir", str(run_dir), *TINY_MODEL,
            "--set", f"data.train={shards}", "--set", "data.batch_size=8",
            "--set", "data.shuffle_buffer=32", "--set", "data.shuffle_initial=8",
            "--set", "schedule.warmup_steps=2", "--set", "log.every=1",
            "--set", "schedule.steps=400", "--set", "checkpoint.every=1000", *extra]


def _torchrun(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(find_free_port()),
               str(ROOT / "launch" / "pretrain.py"), *args]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _ranks(launcher: subprocess.Popen) -> list[psutil.Process]:
    """The rank processes under either launcher: those given a LOCAL_RANK by a parent that has
    none (their data-loader workers inherit theirs)."""
    def local_rank(process: psutil.Process) -> str | None:
        return process.environ().get("LOCAL_RANK")

    tree = psutil.Process(launcher.pid).children(recursive=True)
    return [p for p in tree if local_rank(p) is not None and local_rank(p.parent()) is None]


def _finish(process: subprocess.Popen, within: float) -> tuple[str, float]:
    began = time.monotonic()
    try:
        output, _ = process.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"the job outlived {within} s:\n{output[-4000:]}") from None
    return output, time.monotonic() - began


def _wait_gone(processes: list[psutil.Process], within: float) -> None:
    _, alive = psutil.wait_procs(processes, timeout=within)
    for process in alive:
        process.kill()
    assert not alive, f"{len(alive)} processes of the job outlived it"


@pytest.mark.slow  # ~65 s; the fast suite has the roll call in tests/test_collectives.py
def test_a_frozen_rank_ends_the_job_within_the_timeout_naming_it(shape_shards: dict,
                                                                 tmp_path: Path) -> None:
    """SIGSTOP one rank mid-run (a node that freezes): the other exits non-zero once the
    collective timeout and the roll call have passed, with one line naming the frozen rank."""
    run_dir = tmp_path / "run"
    process = start("pretrain.py", _args(run_dir, shape_shards["train"],
                                         "--set", f"train.collective_timeout={TIMEOUT_S}"))
    wait_for(lambda: logged_step(run_dir) >= 2, process)
    frozen = next(p for p in rank_processes(process) if "--local_rank=1" in p.cmdline())
    frozen.suspend()
    try:
        # timeout + roll call + DeepSpeed's 30 s grace before it SIGKILLs the frozen rank
        output, took = _finish(process, within=TIMEOUT_S + TIMEOUT_S + 30 + 30)
    finally:
        if frozen.is_running():
            frozen.kill()
    assert process.returncode != 0
    aborted = [line for line in output.splitlines() if "training aborted" in line]
    assert len(aborted) == 1, output[-4000:]
    assert f"a collective waited {TIMEOUT_S} s (train.collective_timeout) for rank 1, which " \
           "did not arrive" in aborted[0]
    assert "Traceback" not in output, output[-4000:]


def _start(launcher: str, args: list[str]) -> subprocess.Popen:
    """A 2-rank job under DeepSpeed's launcher or torchrun, wandb logging offline (so rank 0
    has wandb's service process as a child, as in real runs)."""
    if launcher == "deepspeed":
        return start("pretrain.py", args, env={"WANDB_MODE": "offline"})
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline"}
    return _torchrun(args, env)


def _assert_saved_once(run_dir: Path, output: str, step: int) -> None:
    """A checkpoint within a few steps of ``step`` (the last logged when the signal was sent;
    steps take ~0.2 s here, and a signal that reaches a rank through its launcher's death
    is one hop later), the outcome said once, and no traceback from any rank."""
    assert (run_dir / "checkpoints" / "latest").is_file(), output[-5000:]
    saved = int((run_dir / "checkpoints" / "latest").read_text().removeprefix("step_"))
    assert step <= saved <= step + 4, (saved, step)
    assert read_training_metrics(run_dir / "metrics.jsonl")[-1]["step"] == saved
    assert output.count("pretrain preempted in") == 1, output[-4000:]
    assert "Traceback" not in output, output[output.find("Traceback") - 1000:][:6000]


@pytest.mark.parametrize(("launcher", "signum"), [
    ("deepspeed", signal.SIGTERM),
    pytest.param("torchrun", signal.SIGTERM, marks=pytest.mark.slow),
    pytest.param("deepspeed", signal.SIGUSR1, marks=pytest.mark.slow),
    pytest.param("torchrun", signal.SIGUSR1, marks=pytest.mark.slow)])
def test_a_signal_to_the_process_group_saves_and_exits_cleanly(
        launcher: str, signum: int, shape_shards: dict, tmp_path: Path) -> None:
    """Preemption as SLURM delivers it: the signal to every process of the job (launcher,
    ranks, data workers; DeepSpeed's launcher then SIGTERMs every descendant of each rank,
    wandb's service included) after step k. The step finishes, a checkpoint at step k or k+1
    is written, rank 0 says so once, and no rank fails.

    The launchers' own exit status is theirs: DeepSpeed's exits 1 (or dies of the signal)
    whatever its ranks did, torchrun raises SignalException for SIGTERM and dies of SIGUSR1.
    """
    run_dir = tmp_path / "run"
    process = _start(launcher, _args(run_dir, shape_shards["train"], "--set", "data.workers=2"))
    wait_for(lambda: logged_step(run_dir) >= 2, process)
    ranks = _ranks(process)
    assert len(ranks) == 2
    step = logged_step(run_dir)
    os.killpg(process.pid, signum)
    output, _ = _finish(process, within=120)
    _wait_gone(ranks, within=30)
    _assert_saved_once(run_dir, _without_launcher_traceback(output, process.pid), step)


def _without_launcher_traceback(output: str, launcher_pid: int) -> str:
    """``output`` less torchrun's own SignalException traceback (the launcher's, not a rank's)."""
    end = f"SignalException: Process {launcher_pid} got signal: 15"
    if end not in output:
        return output
    start_at = output.rfind("Traceback", 0, output.index(end))
    return output[:start_at] + output[output.index(end) + len(end):]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_ranks_save_and_exit_when_their_launcher_is_killed(launcher: str, shape_shards: dict,
                                                          tmp_path: Path) -> None:
    """kill -9 of the launcher alone (an OOM kill, a lost ssh session): the ranks do not train
    on unwatched; their parent's death is a preemption signal (save, exit)."""
    run_dir = tmp_path / "run"
    process = _start(launcher, _args(run_dir, shape_shards["train"]))
    wait_for(lambda: logged_step(run_dir) >= 2, process)
    ranks = _ranks(process)
    step = logged_step(run_dir)
    ranks[0].parent().kill()  # DeepSpeed's per-node launch.py, or torchrun itself
    _wait_gone(ranks, within=90)
    output, _ = _finish(process, within=30)
    _assert_saved_once(run_dir, output, step)


@pytest.mark.slow
def test_the_rank_waiting_for_data_is_named_in_the_metrics(shape_shards: dict,
                                                            tmp_path: Path) -> None:
    """Rank 1's data worker freezes for 6 s (a stalled read): the log record of that step
    shows rank 1's wait, not rank 0's, which had its data on time."""
    run_dir = tmp_path / "run"
    process = start("pretrain.py", _args(run_dir, shape_shards["train"],
                                         "--set", "data.workers=1", "--set", "schedule.steps=14"))
    wait_for(lambda: logged_step(run_dir) >= 2, process)
    rank1 = next(p for p in rank_processes(process) if "--local_rank=1" in p.cmdline())
    worker = rank1.children()[0]
    worker.suspend()
    time.sleep(6)
    worker.resume()
    output, _ = _finish(process, within=120)
    assert process.returncode == 0, output[-3000:]
    records = read_training_metrics(run_dir / "metrics.jsonl")
    stalled = max(records, key=lambda r: r["data_wait_s"])
    assert stalled["data_wait_rank"] == 1 and stalled["data_wait_s"] > 3, stalled
    assert stalled["step_time_s"] > 3
