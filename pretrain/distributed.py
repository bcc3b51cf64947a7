"""The process group: joining it, the only collectives the project calls, and cleaning up after
DeepSpeed's CPU backend.

Every collective goes through this module (a test greps the packages to keep it so). NCCL only
accepts tensors on the rank's own GPU, while gloo forgives CPU tensors; the helpers here move
what they are given to :func:`collective_device` and hand back CPU results, so callers build
small flag and count tensors wherever is convenient and the same code is right on both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

# DeepSpeed's CPU backend (deepspeed/ops/csrc/cpu/comm/shm.cpp) names each rank's segment
# "deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>" under /dev/shm.
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer"

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def init_distributed(backend: str) -> None:
    """Join the process group the launcher describes (or a group of one without a launcher),
    with this rank's accelerator selected, so collectives and the engine agree on the device."""
    if dist.is_initialized():
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        os.environ.setdefault(key, value)
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend=backend)
    release_shared_memory_names()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def collective_device() -> torch.device:
    """Where collective tensors must live: this rank's GPU under NCCL, the CPU under gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device(get_accelerator().current_device_name())
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce(values: torch.Tensor | list[float], op: str = "sum") -> torch.Tensor:
    """``values`` reduced over every rank (``op``: sum, max or min), returned on the CPU.

    A list of Python numbers becomes a float64 tensor, so counts stay exact well past 2**24.
    """
    tensor = (values if isinstance(values, torch.Tensor)
              else torch.tensor(values, dtype=torch.float64))
    if world_size() == 1:
        return tensor.detach().cpu()
    on_device = tensor.detach().to(collective_device(), copy=True)
    dist.all_reduce(on_device, op=_OPS[op])
    return on_device.cpu()


def any_rank(flag: bool) -> bool:
    """True when ``flag`` is true on at least one rank (every rank gets the same answer)."""
    return bool(all_reduce([1.0 if flag else 0.0], op="max")[0])


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (for results of uneven size, such as
    detections). Objects travel through the collective device, as NCCL requires."""
    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_objects(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's picklable ``obj`` in rank order on rank ``dst`` (``None`` elsewhere): for
    results only one rank scores, such as a split's detections, which every rank need not hold."""
    if world_size() == 1:
        return [obj]
    gathered: list[Any] | None = [None] * world_size() if rank() == dst else None
    dist.gather_object(obj, gathered, dst=dst)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank."""
    if world_size() == 1:
        return obj
    holder = [obj if rank() == src else None]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


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
