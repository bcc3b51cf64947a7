"""How many intra-op threads a process runs: its share of the node's cores.

PyTorch starts as many intra-op threads as the machine has cores. torchrun sets
``OMP_NUM_THREADS=1`` for its ranks when the user has not; DeepSpeed's launcher sets nothing
(only with ``--bind_cores_to_rank``), so 8 ranks on a 96-core node would each start 96 threads and
fight over the cores for every CPU-side piece of work (collate, host copies, ZeRO-Offload's CPU
Adam); on a CPU-only machine the whole step is such work (2 ranks x 2 threads on 2 cores trained
2.4-4x slower than with one thread each). Every entry point therefore calls
:func:`apply_thread_policy` first:

* ``OMP_NUM_THREADS`` set (by the user, a SLURM script or a launcher): it wins, unchanged;
* otherwise each process takes ``cores in its affinity mask // local ranks sharing it`` (at least
  1). The local ranks are ``LOCAL_WORLD_SIZE`` (torchrun) or ``LOCAL_SIZE`` (DeepSpeed's
  launcher); a process started by ``srun --cpu-bind=cores`` has a mask of its own and neither
  variable, so it takes its whole mask.

Data-loader workers run one thread each: PyTorch's worker loop sets that itself. The choice is
not exported as ``OMP_NUM_THREADS``: a driver such as the demo applies the policy to itself and
then launches jobs whose ranks must still find the variable unset and take their own share.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TextIO

import torch

LOCAL_RANK_COUNT_VARIABLES = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE")


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str

    def describe(self) -> str:
        return f"intra-op threads per process: {self.threads} ({self.reason})"


def local_rank_count(environ: Mapping[str, str] = os.environ) -> int:
    """How many processes of this job share this node's affinity mask (1 when not launched)."""
    for name in LOCAL_RANK_COUNT_VARIABLES:
        value = environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def choose_threads(environ: Mapping[str, str] = os.environ,
                   cores: int | None = None) -> ThreadChoice:
    """The policy above, without applying it (``cores``: the affinity mask's size)."""
    user = environ.get("OMP_NUM_THREADS", "").strip()
    if user:
        if not user.isdigit() or int(user) < 1:
            raise ValueError(f"OMP_NUM_THREADS={user!r} is not a positive integer")
        return ThreadChoice(int(user), "OMP_NUM_THREADS is set")
    cores = len(os.sched_getaffinity(0)) if cores is None else cores
    ranks = local_rank_count(environ)
    share = max(1, cores // ranks)
    return ThreadChoice(share, f"{cores} cores in the affinity mask / {ranks} local "
                               f"rank{'s' if ranks > 1 else ''}; OMP_NUM_THREADS not set")


def apply_thread_policy(log: TextIO | None = sys.stdout) -> ThreadChoice:
    """Apply :func:`choose_threads` to this process; rank 0 prints the choice once to ``log``
    (a job's log is its standard output; tools whose output is data pass ``sys.stderr``)."""
    choice = choose_threads()
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    if log is not None and os.environ.get("RANK", "0") == "0":
        print(choice.describe(), file=log, flush=True)
    return choice

