"""Joining the process group, and cleaning up after DeepSpeed's CPU backend."""

from __future__ import annotations

import os
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

# DeepSpeed's CPU backend (deepspeed/ops/csrc/cpu/comm/shm.cpp) names each rank's segment
# "deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>" under /dev/shm.
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer"


def init_distributed(backend: str) -> None:
    """Join the process group the launcher describes (or a group of one without a launcher)."""
    if dist.is_initialized():
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        os.environ.setdefault(key, value)
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    release_shared_memory_names()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shared_memory_segment(rank: int) -> Path:
    """The /dev/shm file DeepSpeed's CPU backend creates for ``rank`` of this job."""
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"{SHM_PREFIX}_{os.getuid()}_{address}_{port}_{rank}"


def release_shared_memory_names() -> None:
    """Unlink this rank's DeepSpeed shared-memory segment once every rank has mapped it.

    When all ranks share one machine, DeepSpeed's CPU backend creates a ~66 MB segment per rank
    for its shared-memory all-reduce while joining the group, maps every peer's, and never
    unlinks them: every CPU job left them in /dev/shm (RAM), 20 GB after a day of tests here.
    After the barrier every rank has mapped every segment, so the names can go; the mappings
    stay valid and the kernel frees the memory when the last rank exits, even after kill -9.
    GPU accelerators create no segment, so GPU jobs skip the extra barrier.
    """
    if get_accelerator().device_name() != "cpu":
        return
    barrier()
    shared_memory_segment(dist.get_rank()).unlink(missing_ok=True)
