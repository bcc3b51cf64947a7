"""A rank's resumable training stream as the trainer sees it: per-worker positions, the
DataLoader that carries them, and the seed of each item's augmentation.

A stream (:mod:`pretrain.engine.shard_stream`, the fine-tuning folder streams) hands out
batches that carry ``worker`` (the logical worker that made it) and ``position`` (that worker's
:class:`WorkerPosition` after it); :class:`TrainLoader` keeps them in the rank's
:class:`StreamState`, which the checkpoint saves. The DataLoader hands out batches round-robin
over workers; resuming rotates the workers' roles (:func:`logical_worker`) so that the next batch
comes from the same logical worker as in an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from data_tools.workers import die_with_parent
from pretrain.engine.errors import TrainingAborted
from pretrain.engine.read_failures import STREAM_ERROR as _STREAM_ERROR


@dataclass
class WorkerPosition:
    """Where one logical worker is in its stream, and what it has skipped so far."""

    consumed: int = 0
    bad_samples: int = 0
    bad_shards: int = 0
    # Shards given up on (URL -> index of the draw that gave up): never opened again.
    dead_shards: dict[str, int] = field(default_factory=dict)


@dataclass
class StreamState:
    """Resumable position of one rank's data stream."""

    micro_batches: int = 0
    workers: list[WorkerPosition] = field(default_factory=lambda: [WorkerPosition()])

    @property
    def skipped(self) -> int:
        return sum(w.bad_samples + w.bad_shards for w in self.workers)

    def to_dict(self) -> dict[str, Any]:
        return {"micro_batches": self.micro_batches, "workers": [asdict(w) for w in self.workers]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamState:
        workers = [WorkerPosition(**w) for w in data["workers"]]
        return cls(micro_batches=int(data["micro_batches"]), workers=workers)

    @classmethod
    def fresh(cls, num_workers: int) -> StreamState:
        return cls(workers=[WorkerPosition() for _ in range(max(1, num_workers))])


def item_seed(*parts: int) -> int:
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + part) % (2**63)
    return seed


def _ignore_preemption_signals(worker_id: int) -> None:
    """Data workers leave SIGTERM/SIGUSR1 to their rank, which saves a checkpoint and then
    shuts them down; a worker dying first would abort that save. Since they ignore SIGTERM and
    torch only notices a dead rank between items, a worker busy inside the stream would outlive
    a killed rank: the kernel ends it with its rank instead."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    die_with_parent(os.getppid())


class TrainLoader:
    """Iterates a rank's batches through a DataLoader and tracks the resumable stream state."""

    def __init__(self, stream: IterableDataset, num_workers: int) -> None:
        self.stream = stream
        self.state = stream.state
        self.loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=num_workers,
            prefetch_factor=4 if num_workers else None,
            persistent_workers=False,
            worker_init_fn=_ignore_preemption_signals,
            # Pinned batches make the trainer's non_blocking copies to the GPU asynchronous.
            pin_memory=torch.cuda.is_available(),
        )
        self._iterator: Iterator | None = None

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iterator is None:
            # Starting the iterator draws the workers' base seed from the global torch RNG: at
            # step 1 in a fresh run, right after the RNG was restored in a resumed one. Forked,
            # it leaves training's stream (dropout, drop path) where an uninterrupted run has it.
            with torch.random.fork_rng(devices=[]):
                self._iterator = iter(self.loader)
        try:
            batch = next(self._iterator)
        except Exception:
            # The exception's traceback holds the iterator, so dropping our reference would
            # not stop the workers, and the interpreter's exit would wait on them for ever.
            self.close()
            raise
        if _STREAM_ERROR in batch:
            self.close()
            raise _aborted(batch[_STREAM_ERROR])
        self.state.workers[batch.pop("worker")] = WorkerPosition(**batch.pop("position"))
        self.state.micro_batches += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return self.state.to_dict()

    def close(self) -> None:
        """Stop the data workers. Needed because they ignore SIGTERM: left running, they would
        block the interpreter's exit, which joins its child processes."""
        iterator, self._iterator = self._iterator, None
        # What dropping the last reference would run, now even while an exception's traceback
        # still holds the iterator (torch's worker shutdown: a stop message, a bounded join,
        # then SIGTERM, which they ignore); a worker still busy after that is killed.
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
            for worker in getattr(iterator, "_workers", []):
                if worker.is_alive():
                    worker.kill()


def _aborted(message: str) -> Exception:
    """What the job reports in one line before exiting 1."""
    return TrainingAborted(message)




def resume_stream_state(saved_streams: Sequence[dict[str, Any]], old_world: int, rank: int,
                        world: int, workers: int) -> StreamState:
    """Rank ``rank``'s stream position on resume, from every old rank's saved stream state.

    ``saved_streams[r]`` is old rank ``r``'s :meth:`StreamState.to_dict` (all ``old_world`` of
    them, so a re-deal of the positions onto a new layout has everything it needs; the
    checkpoint's sequence reads each one from its file on first access). Supported:
    the same layout, i.e. the same world size and the same number of data workers per rank
    (``max(1, workers)``), where rank ``rank`` continues exactly its own saved position. A
    changed layout raises :class:`ValueError` with a one-line message naming what changed.
    """
    if len(saved_streams) != old_world:
        raise ValueError(f"the checkpoint holds {len(saved_streams)} ranks' stream positions, "
                         f"expected {old_world}")
    if world != old_world:
        raise ValueError(f"the data streams of {old_world} ranks cannot yet be re-dealt to "
                         f"{world} ranks: resume on {old_world} ranks")
    state = StreamState.from_dict(saved_streams[rank])
    if len(state.workers) != max(1, workers):
        raise ValueError(f"the checkpoint's data streams have {len(state.workers)} workers per "
                         f"rank, the config asks for data.workers={workers}: resume with "
                         f"--set data.workers={len(state.workers)}")
    return state
