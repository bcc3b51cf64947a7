"""Data that can yield no sample ends a run with one line instead of hanging it: ``--check``
refuses empty shard sets cheaply, and the training stream gives up on a set that yields
nothing (in a real DataLoader worker, and in a real two-rank run)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from test_data_helpers import gradient_jpeg

from data_tools.mixture import ShardSet, check_samples, load_mixture
from data_tools.shard_writer import Sample, write_shard, write_sizes
from pretrain.data import decode_caption
from pretrain.engine.images import decode_image
from pretrain.engine.launcher import deepspeed_command
from pretrain.engine.shard_stream import ShardStream
from pretrain.engine.stream import StreamState, TrainLoader
from pretrain.engine.trainer import TrainingAborted

ROOT = Path(__file__).resolve().parents[1]


def _tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return str(path)


def _zero_bytes(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")  # what `: > empty.tar` makes
    return str(path)


def _good_set(folder: Path, samples: int = 12, per_shard: int = 4) -> str:
    for shard in range(samples // per_shard):
        write_shard(folder, shard, [
            Sample(gradient_jpeg((16, 16), seed=shard * per_shard + i), f"good {shard}-{i}")
            for i in range(per_shard)])
    write_sizes(folder)
    return str(folder / f"{{00000..{samples // per_shard - 1:05d}}}.tar")


def _undecodable(path: Path, samples: int = 4) -> str:
    """Samples a cheap scan cannot tell from good ones: HTML saved as .jpg."""
    return _tar(path, [m for i in range(samples) for m in (
        (f"{i:09d}.jpg", b"<!doctype html><title>404</title>"), (f"{i:09d}.txt", b"a page"))])


# ---------------------------------------------------------------- --check, cheaply

def test_check_refuses_sets_without_samples(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"shard set '.*empty\.tar': 1 of 1 shards are 0 bytes"):
        check_samples(load_mixture(_zero_bytes(tmp_path / "empty.tar")))
    header_only = _tar(tmp_path / "h" / "00000.tar", [])
    with pytest.raises(ValueError, match=r"has no samples: each of its 1 shards is an empty tar"):
        check_samples(load_mixture(header_only))
    write_shard(tmp_path / "z", 0, [])
    write_shard(tmp_path / "z", 1, [])
    write_sizes(tmp_path / "z")
    with pytest.raises(ValueError, match=r"count 0 samples in each of its 2 shards"):
        check_samples(load_mixture(str(tmp_path / "z" / "{00000..00001}.tar")))


def test_check_accepts_sets_with_some_empty_shards(tmp_path: Path) -> None:
    good = _good_set(tmp_path / "good")
    write_shard(tmp_path / "good", 3, [])  # counted 0: never drawn
    _tar(tmp_path / "mixed" / "a.tar", [])
    _tar(tmp_path / "mixed" / "b.tar", [("x.jpg", gradient_jpeg((8, 8))), ("x.txt", b"x")])
    check_samples(load_mixture([{"shards": good}, {"shards": good.replace("00002", "00003")},
                                {"shards": str(tmp_path / "mixed" / "{a,b}.tar")}]))


def _check(data_train: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/pretrain.py", "--check", "--config", "demo",
                           "--set", f"data.train={data_train}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_pretrain_check_exits_2_on_an_empty_tar(tmp_path: Path) -> None:
    empty = _zero_bytes(tmp_path / "empty.tar")
    result = _check(empty)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"input error: shard set '{empty}': 1 of 1 shards are 0 bytes (not tars), e.g. {empty}"]


# ---------------------------------------------------------------- the stream gives up

def _decode(sample: dict[str, Any]) -> tuple[str]:
    decode_image(sample)
    return (decode_caption(sample),)


def _collate(items: list[tuple[str]]) -> dict[str, Any]:
    return {"captions": [caption for (caption,) in items], "size": torch.tensor(len(items))}


def _loader(sets: list[ShardSet], workers: int = 1, state: StreamState | None = None,
            batch_size: int = 4) -> TrainLoader:
    stream = ShardStream(sets, _decode, _collate, batch_size=batch_size, seed=3, rank=0,
                         num_workers=workers, shuffle_buffer=16, shuffle_initial=4,
                         state=state or StreamState.fresh(workers))
    return TrainLoader(stream, workers)


@contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    """Fail, rather than hang, if the body takes longer (the old stream never returned)."""
    def expire(signum: int, frame: object) -> None:
        # A hung loader worker ignores SIGTERM (it leaves that to its rank): kill it here, or
        # it spins on after the test; first silence torch's SIGCHLD check of its workers.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for child in psutil.Process().children(recursive=True):
            child.kill()
        raise AssertionError(f"no batch and no error within {seconds} s: the stream hangs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("kind", ["zero bytes", "header only", "undecodable"])
def test_a_set_that_yields_nothing_aborts_in_the_main_process(tmp_path: Path, kind: str) -> None:
    shard = {"zero bytes": lambda: _zero_bytes(tmp_path / "x.tar"),
             "header only": lambda: _tar(tmp_path / "x.tar", []),
             "undecodable": lambda: _undecodable(tmp_path / "x.tar")}[kind]()
    expected = ("read no sample (empty or unreadable tars)" if kind != "undecodable"
                else "the last 1000 samples read from them all failed to decode")
    loader = _loader(load_mixture(shard))  # one real DataLoader worker process
    started = time.monotonic()
    with _deadline(60), pytest.raises(TrainingAborted) as raised:
        next(loader)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"shard set '{shard}' yields no usable samples: 1 of its 1 "
                              "shards were drawn since its last good sample and ")
    assert expected in message
    assert time.monotonic() - started < 30


def test_a_dead_set_in_a_mixture_is_named(tmp_path: Path) -> None:
    good = _good_set(tmp_path / "good")
    dead = str(tmp_path / "dead" / "{0..2}.tar")
    for index in range(3):
        _tar(tmp_path / "dead" / f"{index}.tar", [])
    loader = _loader(load_mixture([{"shards": good, "weight": 0.9},
                                   {"shards": dead, "weight": 0.1}]), workers=0)
    with _deadline(60), pytest.raises(TrainingAborted, match=rf"^shard set '{dead}' yields no "
                                      r"usable samples: 3 of its 3 shards were drawn"):
        for _ in range(10_000):
            next(loader)


def test_all_zero_sample_counts_abort_with_the_set_named(tmp_path: Path) -> None:
    write_shard(tmp_path, 0, [])
    write_sizes(tmp_path)
    loader = _loader(load_mixture(str(tmp_path / "00000.tar")))
    with _deadline(60), pytest.raises(TrainingAborted,
                                      match=r"has no samples: its sample counts are 0"):
        next(loader)


def test_a_dirty_but_usable_set_keeps_streaming(tmp_path: Path) -> None:
    """Empty shards, undecodable samples and unreadable tars beside good ones: no false alarm."""
    good = Path(_good_set(tmp_path / "good", samples=4, per_shard=4).replace("{00000..00000}",
                                                                             "00000"))
    folder = good.parent
    _tar(folder / "e1.tar", [])
    _zero_bytes(folder / "e2.tar")
    _undecodable(folder / "u.tar", samples=40)
    (folder / "sizes.json").unlink()  # uniform draws: the empty shards are drawn too
    loader = _loader(load_mixture(str(folder / "{00000,e1,e2,u}.tar")), workers=0)
    with _deadline(120):
        batches = [next(loader) for _ in range(300)]
    assert sum(int(b["size"]) for b in batches) == 1200
    assert loader.state.skipped > 0


def test_resuming_still_replays_the_same_batches(tmp_path: Path) -> None:
    sets = load_mixture(_good_set(tmp_path / "good", samples=24))
    straight = _loader(sets, workers=0, batch_size=3)
    expected = [next(straight)["captions"] for _ in range(12)]
    first = _loader(sets, workers=0, batch_size=3)
    [next(first) for _ in range(5)]
    state = StreamState.from_dict(json.loads(json.dumps(first.state_dict())))
    resumed = _loader(sets, workers=0, state=state, batch_size=3)
    assert [next(resumed)["captions"] for _ in range(7)] == expected[5:]


# ---------------------------------------------------------------- a real two-rank run

def test_a_two_rank_run_on_undecodable_data_ends_with_one_line(tmp_path: Path) -> None:
    shard = _undecodable(tmp_path / "shards" / "00000.tar", samples=8)
    command = deepspeed_command("pretrain.py", [
        "--config", "demo", "--run-dir", str(tmp_path / "run"), "--set", f"data.train={shard}",
        "--set", "data.workers=1", "--set", "data.batch_size=4"], ranks=2)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "disabled"}
    run = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = run.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        raise AssertionError("the run hung on data that yields no sample") from None
    assert run.returncode != 0, output[-3000:]
    aborted = [line for line in output.splitlines() if "training aborted: shard set" in line]
    assert aborted and all("the last 1000 samples read from them all failed to decode" in line
                           for line in aborted), output[-3000:]
    assert "Traceback" not in output, output[-5000:]
