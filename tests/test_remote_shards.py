"""Shards on object storage fail the way servers fail: a stall after accept, a 503, a reset
mid-shard, a pipe command that hangs. Each is skipped within its bound, named in the skip list,
counted, and never waited for again, not even after a resume.

The stream runs in this process (no DataLoader worker) against a loopback server
(tests/shard_servers.py), with short timeouts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from test_data_helpers import gradient_jpeg

from data_tools.mixture import load_mixture
from data_tools.remote import RemotePolicy
from data_tools.shard_writer import Sample, write_shard, write_sizes
from pretrain.data import decode_caption
from pretrain.engine.images import decode_image
from pretrain.engine.launcher import ROOT, find_free_port
from pretrain.engine.shard_stream import ShardStream
from pretrain.engine.skipped import SkipLog, read_skipped
from pretrain.engine.stream import StreamState, TrainLoader
from tests.shard_servers import FaultServer

POLICY = RemotePolicy(connect_timeout=2.0, read_timeout=1.0, retries=2, backoff=0.2,
                      max_backoff=0.4)
BACKOFF_S = 0.2 + 0.4  # before the second and third attempts


def _shards(folder: Path, count: int = 3, per_shard: int = 8) -> Path:
    for shard in range(count):
        write_shard(folder, shard, [Sample(gradient_jpeg((16, 16), seed=shard * 100 + i),
                                           f"shard {shard} sample {i}")
                                    for i in range(per_shard)])
    write_sizes(folder)
    return folder


def _decode(sample: dict[str, Any]) -> tuple[str]:
    decode_image(sample)
    return (decode_caption(sample),)


def _collate(items: list[tuple[str]]) -> dict[str, Any]:
    return {"captions": [caption for (caption,) in items], "size": torch.tensor(len(items))}


def _loader(pattern: str, run_dir: Path, state: StreamState | None = None) -> TrainLoader:
    stream = ShardStream(load_mixture(pattern, POLICY), _decode, _collate, batch_size=4, seed=5,
                         rank=0, num_workers=0, shuffle_buffer=8, shuffle_initial=2,
                         state=state or StreamState.fresh(0), remote=POLICY,
                         skip_log=SkipLog(run_dir))
    return TrainLoader(stream, 0)


def _mixed(server: FaultServer, fault: str) -> str:
    """Two good shards and the faulty one, drawn uniformly with replacement."""
    return (f"http://127.0.0.1:{server.port}/{{ok/00000.tar,ok/00001.tar,"
            f"{fault}/00002.tar}}")


@pytest.mark.parametrize(("fault", "reason", "attempts", "bound_s"), [
    # stalled: every attempt waits read_timeout for the response, then the backoff
    ("stall", "ReadTimeout", 3, 3 * POLICY.read_timeout + BACKOFF_S),
    # 503: answered at once, retried after each backoff
    ("busy", "HTTP 503 (3 attempts)", 3, BACKOFF_S),
    # reset mid-shard: its first bytes were samples already; not retried
    ("reset", "failed mid-shard", 1, 0.0),
])
def test_a_failing_http_shard_is_skipped_within_its_budget_and_named(
        fault: str, reason: str, attempts: int, bound_s: float, tmp_path: Path) -> None:
    folder = _shards(tmp_path / "shards")
    with FaultServer(folder) as server:
        loader = _loader(_mixed(server, fault), tmp_path / "run")
        began = time.monotonic()
        batches = [next(loader) for _ in range(30)]  # 120 samples: every shard drawn often
        took = time.monotonic() - began
        failed = f"/{fault}/00002.tar"
        assert server.requests[failed] == attempts  # given up on once, never drawn again
        tried = server.times[failed]
    # the attempts span the budget (a stalled one's own wait comes after it) ...
    assert tried[-1] - tried[0] <= bound_s - (fault == "stall") * POLICY.read_timeout + 0.5
    assert took < bound_s + 5.0, took  # ... the rest is reading and decoding 120 samples
    records = read_skipped(tmp_path / "run")
    assert len(records) == 1, records
    assert records[0]["path"] == server.url(fault, "00002.tar")
    assert reason in records[0]["reason"] and records[0]["split"] == "train"
    assert loader.state.skipped == 1
    captions = [c for batch in batches for c in batch["captions"]]
    from_faulty = [c for c in captions if c.startswith("shard 2 ")]
    if fault == "reset":  # the samples before the break arrived, each once
        assert 0 < len(from_faulty) < 8 and len(set(from_faulty)) == len(from_faulty)
    else:
        assert not from_faulty


def test_a_resumed_stream_does_not_wait_for_a_shard_given_up_on(tmp_path: Path) -> None:
    """The state saved after the stall holds the shard given up on: the resumed stream never
    asks the server for it again and yields exactly the batches of the uninterrupted one."""
    folder = _shards(tmp_path / "shards")
    with FaultServer(folder) as server:
        pattern = _mixed(server, "stall")
        loader = _loader(pattern, tmp_path / "run")
        first = [next(loader)["captions"] for _ in range(12)]
        assert server.requests["/stall/00002.tar"] == 3
        saved = json.loads(json.dumps(loader.state_dict()))  # as a checkpoint holds it
        expected = [next(loader)["captions"] for _ in range(12)]

        resumed = _loader(pattern, tmp_path / "run", StreamState.from_dict(saved))
        began = time.monotonic()
        assert [next(resumed)["captions"] for _ in range(12)] == expected
        assert time.monotonic() - began < POLICY.read_timeout  # no stall replayed
        assert server.requests["/stall/00002.tar"] == 3
    assert first and len(read_skipped(tmp_path / "run")) == 1


def test_a_pipe_command_that_hangs_or_fails_is_skipped_and_named(tmp_path: Path) -> None:
    """``pipe:`` shards: a command that never writes ends at the read timeout (and is killed),
    one that fails is retried and then named with its exit."""
    folder = _shards(tmp_path / "shards", count=1)
    good = f"pipe:cat {folder}/00000.tar"
    pattern = f"{{{good},pipe:sleep 120,pipe:cat {folder}/missing.tar}}"
    loader = _loader(pattern, tmp_path / "run")
    began = time.monotonic()
    batches = [next(loader) for _ in range(12)]
    assert time.monotonic() - began < 2 * (3 * POLICY.read_timeout + BACKOFF_S) + 5.0
    reasons = {r["path"]: r["reason"] for r in read_skipped(tmp_path / "run")}
    assert set(reasons) == {"pipe:sleep 120", f"pipe:cat {folder}/missing.tar"}
    assert "no bytes for 1 s" in reasons["pipe:sleep 120"]
    assert reasons[f"pipe:cat {folder}/missing.tar"] == (
        f"OSError: the command exited 1: cat: {folder}/missing.tar: No such file or directory "
        "(3 attempts)")
    assert all(c.startswith("shard 0 ") for b in batches for c in b["captions"])


# ---------------------------------------------------------------- --check probes remote sets

def _check(*overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config", "demo",
               "--check", "--set", "data.remote.retries=0", "--set",
               "data.remote.connect_timeout=2", "--set", "data.remote.read_timeout=2",
               *(arg for override in overrides for arg in ("--set", override))]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("pattern", [
    "http://127.0.0.1:{port}/{{00000..00003}}.tar",  # nothing listening
    "pipe:cat /no/such/dir/{{00000..00003}}.tar",
])
def test_check_refuses_unreachable_remote_shards_in_one_line(pattern: str) -> None:
    shards = pattern.format(port=find_free_port())
    result = _check(f"data.train={shards}")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[0].startswith(f"input error: shard set '{shards}': 4 of 4 probed remote "
                               "shards unusable, e.g. ")


def test_check_probes_remote_shards_and_counts_them_from_sizes_json(tmp_path: Path) -> None:
    """Reachable shards that are tars pass (with the sample counts of the sizes.json beside
    them); one that stalls is refused within its read timeout; an epoch schedule over
    remote shards without a sizes.json is refused in one line, not a traceback per rank."""
    folder = _shards(tmp_path / "shards", count=4)
    with FaultServer(folder) as server:
        good = server.url("ok", "{00000..00003}.tar")
        assert load_mixture(good, POLICY)[0].num_samples == 32  # sizes.json over HTTP
        assert _check(f"data.train={good}").returncode == 0
        began = time.monotonic()
        stalled = _check(f"data.train={server.url('stall', '{00000..00003}.tar')}")
        assert stalled.returncode == 2 and "ReadTimeout" in stalled.stderr
        assert time.monotonic() - began < 4 * 2 + 15  # 4 probes x read_timeout + start-up
        (folder / "sizes.json").unlink()
        unsized = _check(f"data.train={good}", "schedule.steps=null", "schedule.epochs=1")
    assert unsized.returncode == 2
    assert unsized.stderr.strip() == (
        f"input error: schedule.epochs needs the size of the training data, but shard set "
        f"'{good}' has no sizes.json beside its shards: add one or set data.epoch_samples")


def test_a_local_shard_deleted_mid_run_is_skipped_and_named(tmp_path: Path) -> None:
    folder = _shards(tmp_path / "shards")
    loader = _loader(str(folder / "{00000..00002}.tar"), tmp_path / "run")
    (folder / "00002.tar").unlink()  # after start-up checked it
    batches = [next(loader) for _ in range(12)]
    assert [r["path"] for r in read_skipped(tmp_path / "run")] == [str(folder / "00002.tar")]
    assert loader.state.skipped == 1
    assert not any(c.startswith("shard 2 ") for b in batches for c in b["captions"])


@pytest.mark.slow  # a 2-rank run, ~30 s
def test_a_two_rank_run_over_http_survives_a_stalled_shard(tmp_path: Path) -> None:
    """The field case: 2 ranks read their shards over HTTP and one shard's server accepts and
    never answers. The run completes; every worker that drew it waited once, within the
    bounds, and named it in skipped.jsonl."""
    from tests.conftest import TINY_MODEL
    from tests.jobs import start

    folder = _shards(tmp_path / "shards")  # 8 samples a shard: many draws per worker
    with FaultServer(folder) as server:
        shards = (f"http://127.0.0.1:{server.port}/{{ok/00000.tar,ok/00001.tar,ok/00002.tar,"
                  f"stall/00003.tar}}")
        run_dir = tmp_path / "run"
        process = start("pretrain.py", [
            "--config", "demo", "--run-dir", str(run_dir), *TINY_MODEL,
            "--set", f"data.train={shards}", "--set", "data.batch_size=8",
            "--set", "data.shuffle_buffer=32", "--set", "data.shuffle_initial=8",
            "--set", "schedule.steps=20", "--set", "schedule.warmup_steps=2",
            "--set", "log.every=4", "--set", "data.workers=1",
            "--set", "data.remote.read_timeout=2", "--set", "data.remote.retries=1",
            "--set", "data.remote.backoff=0.5", "--set", "data.remote.probe_shards=3"])
        output, _ = process.communicate(timeout=240)
        stalled_requests = server.requests["/stall/00003.tar"]
    assert process.returncode == 0, output[-4000:]
    records = read_skipped(run_dir)
    assert records and {r["path"] for r in records} == {server.url("stall", "00003.tar")}
    assert len(records) == len({r["rank"] for r in records})  # once per worker (1 per rank)
    assert stalled_requests == 2 * len(records)  # first try + 1 retry, never drawn again
    assert all("ReadTimeout" in r["reason"] for r in records)
    assert output.count("pretrain completed in") == 1


def test_an_evaluation_split_over_http_is_read_whole_or_fails_within_its_bound(
        tmp_path: Path) -> None:
    """Evaluation reads every sample once, remote shards too; a stalled shard ends the read
    with an error after its attempts instead of hanging the evaluation."""
    from data_tools.remote import ShardUnavailable
    from pretrain.engine.shard_stream import ordered_dataset

    folder = _shards(tmp_path / "shards")
    with FaultServer(folder) as server:
        samples = list(ordered_dataset(server.url("ok", "{00000..00002}.tar"), POLICY))
        assert [s["txt"].decode() for s in samples] == [
            f"shard {shard} sample {i}" for shard in range(3) for i in range(8)]
        began = time.monotonic()
        with pytest.raises(ShardUnavailable, match="ReadTimeout"):
            list(ordered_dataset(server.url("stall", "00000.tar"), POLICY))
        assert time.monotonic() - began < 3 * POLICY.read_timeout + BACKOFF_S + 1.0
