"""The process group: joining it with a bounded wait, the only collectives the project calls,
naming the rank a timed-out collective waited for, and cleaning up after DeepSpeed's CPU backend.

Every collective goes through this module (a test greps the packages to keep it so). NCCL only
accepts tensors on the rank's own GPU, while gloo forgives CPU tensors; the helpers here move
what they are given to :func:`collective_device` and hand back CPU results, so callers build
small flag and count tensors wherever is convenient and the same code is right on both.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from deepspeed.accelerator import get_accelerator

# DeepSpeed's CPU backend (deepspeed/ops/csrc/cpu/comm/shm.cpp) names each rank's segment
# "deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>" under /dev/shm.
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer"

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
# The default of train.collective_timeout (seconds), for callers that join without a config.
DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0
# The longest a rank waits, after a timed-out collective, for the others to report in.
MAX_PROBE_S = 30.0
# Side groups on gloo (also under NCCL) for that roll call: every rank, coordinated by rank 0,
# and every rank but 0, coordinated by rank 1 (for when rank 0 is the one that is missing).
_roll_call: dict[str, Any] = {}


def init_distributed(backend: str,
                     collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> None:
    """Join the process group the launcher describes (or a group of one without a launcher),
    with this rank's accelerator selected, so collectives and the engine agree on the device.

    Every collective of the job waits at most ``collective_timeout_s``: the world group's,
    and every group created later, DeepSpeed's ZeRO groups included (:func:`bound_every_wait`).
    """
    timeout = timedelta(seconds=collective_timeout_s)
    if not dist.is_initialized():
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
            os.environ.setdefault(key, value)
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        accelerator = get_accelerator()
        if accelerator.device_name() != "cpu":
            accelerator.set_device(int(os.environ["LOCAL_RANK"]))
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
        release_shared_memory_names()
    bound_every_wait(timeout)


def bound_every_wait(timeout: timedelta) -> None:
    """Give every process group of this process, existing or future, ``timeout``.

    ``deepspeed.init_distributed(timeout=...)`` bounds the world group only. DeepSpeed creates
    its ZeRO data-parallel groups with a bare ``torch.distributed.new_group(ranks)``
    (deepspeed/utils/groups.py), which takes torch's module default: 30 minutes on gloo
    (10 on NCCL), so a frozen rank held the others half an hour. torch offers no setter for
    that default; ``new_group`` reads it from ``distributed_c10d`` when called, so it is set
    there, and groups that exist already get theirs through ``torch.distributed.set_timeout``.
    """
    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout
    for group in list(c10d._world.pg_map):
        dist.set_timeout(timeout, group)
    if world_size() > 1 and not _roll_call:
        _roll_call["all"] = dist.new_group(backend="gloo")
        if world_size() > 2:  # every rank enters new_group, members or not
            _roll_call["rest"] = dist.new_group(list(range(1, world_size())), backend="gloo")


def group_timeouts() -> list[float]:
    """The timeout, in seconds, of every backend of every process group of this process."""
    timeouts = []
    for group in list(c10d._world.pg_map):
        for device in ("cpu", "cuda"):
            try:
                backend = group._get_backend(torch.device(device))
            except RuntimeError:  # no backend for that device in this group
                continue
            timeouts.append(backend.options._timeout.total_seconds())
    return timeouts


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective that timed out or lost a peer (gloo raises these as
    ``RuntimeError``; NCCL's watchdog ends the process itself after the same timeout)."""
    text = str(error)
    return isinstance(error, dist.DistError) or isinstance(error, RuntimeError) and any(
        marker in text for marker in ("Timed out waiting", "Connection closed by peer",
                                      "Connection reset by peer"))


def missing_ranks_report(timeout_s: float) -> str | None:
    """After a collective failed (:func:`is_collective_failure`): the one line that names the
    rank(s) that did not arrive, on the one rank that should print it, else ``None``.

    Every surviving rank enters a roll call on a side gloo group, coordinated by rank 0 (by
    rank 1 when rank 0 is the one missing): the coordinator learns which ranks failed to
    report within the probe time (torch's ``monitored_barrier``). A rank whose coordinator
    closed the connection stays quiet: the coordinator has spoken and exited.
    """
    probe = min(timeout_s, MAX_PROBE_S)
    waited = f"a collective waited {timeout_s:g} s (train.collective_timeout)"
    outcome = _roll(_roll_call.get("all"), probe, coordinator=rank() == 0)
    if outcome == "gone":
        return None
    if rank() == 0:
        if not outcome:
            return (f"{waited}, but every rank answered the roll call afterwards: a slow "
                    "network link or a rank that was too slow, not a frozen one")
        return f"{waited} for {_ranks(outcome)}, which did not arrive (frozen, stalled or lost)"
    if outcome != "timeout":
        return None  # rank 0 reports (the roll call passed or named the missing ranks)
    # Rank 0 did not answer: the ranks left hold a roll call of their own, led by rank 1.
    missing = [0]
    if "rest" in _roll_call:
        rest = _roll(_roll_call["rest"], probe, coordinator=rank() == 1)
        if rank() != 1 or rest == "gone":
            return None
        missing += [r + 1 for r in rest] if isinstance(rest, list) else []
    return f"{waited} for {_ranks(missing)}, which did not arrive (frozen, stalled or lost)"


def _roll(group: Any, probe_s: float, coordinator: bool) -> list[int] | str:
    """One ``monitored_barrier``: the missing group ranks (the coordinator), ``[]`` when all
    came, ``"timeout"`` when a non-coordinator got no answer, ``"gone"`` when a peer left."""
    # The others wait longer than the coordinator, so that a live coordinator always answers
    # (or leaves, closing the connection) before they give up on it.
    wait = timedelta(seconds=probe_s if coordinator else 2 * probe_s)
    try:
        dist.monitored_barrier(group=group, timeout=wait, wait_all_ranks=True)
    except RuntimeError as error:
        text = str(error)
        found = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", text)
        if coordinator and found:
            return sorted({int(r) for r in re.findall(r"\d+", found.group(1))})
        return "timeout" if "imed out" in text else "gone"
    return []


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


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
