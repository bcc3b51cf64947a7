"""Every collective goes through pretrain.engine.distributed, which places tensors where the backend
needs them (NCCL: the rank's GPU). gloo accepts CPU tensors, so a direct call elsewhere would pass
every test here and fail on the first multi-GPU step: this test keeps them out."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from pretrain.engine import distributed

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pretrain", "finetune", "data_tools", "launch")
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
    "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
    "all_to_all_single", "gather", "gather_object", "scatter", "scatter_object_list", "barrier",
    "send", "recv", "isend", "irecv",
}


def _collective_calls(path: Path) -> list[str]:
    """``module.collective(...)`` calls whose module is torch.distributed or deepspeed.comm
    under any alias, and names imported from them."""
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in ("torch.distributed", "deepspeed.comm"):
                    aliases.add(alias.asname or alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module in (
                "torch.distributed", "deepspeed.comm", "deepspeed", "torch"):
            for alias in node.names:
                if alias.name in COLLECTIVES:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {alias.name}")
                if alias.name in ("distributed", "comm"):
                    aliases.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = ast.unparse(node.func.value)
            if node.func.attr in COLLECTIVES and (owner in aliases or owner in (
                    "torch.distributed", "deepspeed.comm")):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {owner}.{node.func.attr}")
    return found


def test_no_collective_outside_the_helper() -> None:
    offenders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path != ROOT / "pretrain" / "engine" / "distributed.py":
                offenders += _collective_calls(path)
    assert offenders == []


def test_the_guard_finds_direct_calls(tmp_path: Path) -> None:
    sample = ROOT / "pretrain" / "_guard_sample.py"
    try:
        sample.write_text("import torch\nimport torch.distributed as dist\n"
                          "from torch.distributed import all_gather\n"
                          "dist.all_reduce(torch.ones(1))\n"
                          "torch.distributed.broadcast(torch.ones(1), 0)\n")
        assert len(_collective_calls(sample)) == 3
    finally:
        sample.unlink()


def test_helpers_work_without_a_process_group() -> None:
    """A job of one (no launcher) runs the same code: reductions are the identity."""
    assert distributed.world_size() == 1 and distributed.rank() == 0
    assert distributed.all_reduce([1.0, 2.0]).tolist() == [1.0, 2.0]
    assert distributed.all_reduce(torch.tensor([3.0]), op="max").device.type == "cpu"
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]
    assert distributed.gather_objects({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_object({"b": 2}) == {"b": 2}
    assert distributed.collective_device() == torch.device("cpu")


def _two_rank_worker(rank: int, port: int, results: dict) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results[rank] = {
            "sum": distributed.all_reduce([rank + 1.0, 10.0]).tolist(),
            "max": distributed.all_reduce(torch.tensor([float(rank)]), op="max").tolist(),
            "any": distributed.any_rank(rank == 1),
            "objects": distributed.all_gather_objects({"rank": rank, "boxes": [rank] * rank}),
            "gathered": distributed.gather_objects([rank] * (rank + 1)),
            "broadcast": distributed.broadcast_object(f"from {rank}", src=1),
        }
    finally:
        dist.destroy_process_group()


def test_helpers_reduce_across_two_real_ranks() -> None:
    import torch.multiprocessing as mp

    from pretrain.engine.launcher import find_free_port

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_two_rank_worker, args=(find_free_port(), results), nprocs=2)
        results = dict(results)
    for rank in (0, 1):
        assert results[rank] == {"sum": [3.0, 20.0], "max": [1.0], "any": True,
                                 "objects": [{"rank": 0, "boxes": []},
                                             {"rank": 1, "boxes": [1]}],
                                 "gathered": [[0], [1, 1]] if rank == 0 else None,
                                 "broadcast": "from 1"}


def _bounded_worker(rank: int, port: int, stalled: int, results: dict) -> None:
    """Joins like a job (DeepSpeed's init, timeout 2 s), lets DeepSpeed create its ZeRO
    data-parallel group, then rank ``stalled`` stops answering (alive, stuck in its data
    loader, say) while the other enters a collective."""
    import os
    import time

    from deepspeed.utils import groups

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2")
    distributed.init_distributed("gloo", collective_timeout_s=2.0)
    groups._get_data_parallel_group()  # what ZeRO all-gathers on: torch's default before
    results[f"timeouts{rank}"] = sorted(set(distributed.group_timeouts()))
    began = time.monotonic()
    if rank == stalled:
        time.sleep(7)  # past the other's timeout and roll call, then leave
        return
    try:
        distributed.all_reduce([1.0])
    except RuntimeError as error:
        assert distributed.is_collective_failure(error)
        results[rank] = (distributed.missing_ranks_report(2.0), time.monotonic() - began)


@pytest.mark.parametrize("stalled", [1, 0])
def test_a_rank_that_does_not_arrive_is_named_within_the_timeout(stalled: int) -> None:
    """Every group (the world's and DeepSpeed's ZeRO group) waits train.collective_timeout,
    not torch's 30 minutes; the rank left waiting names the one that did not arrive, after
    the timeout and a roll call of the same length (rank 0 missing: rank 1 says so)."""
    import torch.multiprocessing as mp

    from pretrain.engine.launcher import find_free_port

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_bounded_worker, args=(find_free_port(), stalled, results), nprocs=2)
        results = dict(results)
    assert results["timeouts0"] == results["timeouts1"] == [2.0]
    report, took = results[1 - stalled]
    assert report == (f"a collective waited 2 s (train.collective_timeout) for rank {stalled}, "
                      "which did not arrive (frozen, stalled or lost)")
    assert took < 2.0 + 2 * 2.0 + 2.0
