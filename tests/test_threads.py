"""The thread policy every entry point applies: a rank's share of the node's cores unless the
user set OMP_NUM_THREADS; one thread per data-loader worker."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.engine.launcher import find_free_port
from pretrain.engine.threads import choose_threads

SCRIPT = Path(__file__).resolve().parent / "scripts" / "report_threads.py"


@pytest.mark.parametrize(("environ", "cores", "threads"), [
    ({"LOCAL_SIZE": "2"}, 2, 1),              # DeepSpeed's launcher, 2 ranks on 2 cores
    ({"LOCAL_WORLD_SIZE": "8"}, 96, 12),      # torchrun-style node of 8 GPUs, 96 cores
    ({"LOCAL_SIZE": "8"}, 4, 1),              # more ranks than cores: at least one each
    ({}, 12, 12),                             # srun --cpu-bind: the task's own mask
    ({"LOCAL_SIZE": "8", "OMP_NUM_THREADS": "3"}, 96, 3),  # the user's value wins
])
def test_share_of_the_affinity_mask(environ: dict, cores: int, threads: int) -> None:
    assert choose_threads(environ, cores=cores).threads == threads


def test_a_malformed_user_value_is_refused() -> None:
    with pytest.raises(ValueError, match="OMP_NUM_THREADS='two'"):
        choose_threads({"OMP_NUM_THREADS": "two"}, cores=4)


def _launch(environ: dict[str, str]) -> tuple[dict, subprocess.CompletedProcess]:
    """{rank: (intra-op threads, a data-loader worker's threads)} under DeepSpeed's launcher,
    and the launch's output."""
    launcher = Path(sys.executable).with_name("deepspeed")
    command = [str(launcher), "--num_gpus", "2", "--master_port", str(find_free_port()),
               str(SCRIPT)]
    result = subprocess.run(command, env=environ, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    found = re.findall(r"rank (\d) threads (\d+) worker_threads (\d+)", result.stdout)
    assert len(found) == 2, result.stdout[-2000:]
    return {int(rank): (int(threads), int(worker)) for rank, threads, worker in found}, result


def test_two_ranks_share_the_cores_and_workers_run_one_thread() -> None:
    environ = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    per_rank, result = _launch(environ)
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    assert per_rank == {0: (share, 1), 1: (share, 1)}
    announced = [line for line in result.stdout.splitlines() if "intra-op threads" in line]
    assert len(announced) == 1 and "/ 2 local ranks" in announced[0], result.stdout[-2000:]


def test_the_users_omp_num_threads_wins() -> None:
    per_rank, result = _launch({**os.environ, "OMP_NUM_THREADS": "3"})
    assert per_rank == {0: (3, 1), 1: (3, 1)}
    assert "intra-op threads per process: 3 (OMP_NUM_THREADS is set)" in result.stdout
