"""A rank's resumable training stream: the base every training stream builds on, the
per-worker positions it hands out, and the DataLoader that carries them to the checkpoint.

:class:`ResumableStream` owns what every stream shares: which logical worker a DataLoader
worker plays (:meth:`ResumableStream.logical_worker`), the seeding of each item's augmentation
(:func:`pretrain.engine.random_draws.seeded_rngs`), the skip counting and the position
(:class:`WorkerPosition`), the batching into micro-batches carrying ``worker`` (the logical
worker that made it) and ``position`` (that worker's position after it), and the giving up: a
:class:`StreamGaveUp` raised anywhere in a worker's pass becomes one
:func:`pretrain.engine.read_failures.stream_error` item, which :class:`TrainLoader` raises as the
engine's ``TrainingAborted`` (one line, exit 1). A stream supplies the rest: which items a
worker takes from its saved position (:meth:`ResumableStream.worker_pass`: an epoch
permutation dealt to ranks x workers, shard draws, aspect groups), how one is loaded and
augmented (:meth:`ResumableStream.load_item`) and how a micro-batch is collated. The file
streams (one file per item) build on :class:`FileStream`, which deals their items to ranks x
workers and gives up after a streak of failed reads (:class:`FilePass`).

:class:`TrainLoader` keeps the batches' positions in the rank's :class:`StreamState`, which the
checkpoint saves. The DataLoader hands out batches round-robin over workers; resuming rotates
the workers' roles (:meth:`ResumableStream.logical_worker`) so that the next batch comes from
the same logical worker as in an uninterrupted run.
"""

from __future__ import annotations

import itertools
import os
import signal
from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_tools.workers import die_with_parent
from pretrain.engine.deal import Deal, redeal
from pretrain.engine.errors import TrainingAborted
from pretrain.engine.random_draws import seeded_rngs
from pretrain.engine.read_failures import STREAM_ERROR as _STREAM_ERROR
from pretrain.engine.read_failures import FailureStreak, stream_error
from pretrain.engine.skipped import SkipLog


@dataclass
class WorkerPosition:
    """Where one logical worker is in its stream, and what it has skipped so far."""

    consumed: int = 0
    bad_samples: int = 0
    bad_shards: int = 0
    # Shards given up on (URL -> index of the draw that gave up): never opened again.
    dead_shards: dict[str, int] = field(default_factory=dict)
    # The shard stream's: what the worker's stream is seeded from ([rank, worker] of the run
    # that began it; None: this rank and worker), and where it resumes without replaying
    # (pretrain.engine.shard_stream).
    stream: list[int] | None = None
    resume: dict[str, Any] | None = None


@dataclass
class StreamState:
    """Resumable position of one rank's data stream."""

    micro_batches: int = 0
    workers: list[WorkerPosition] = field(default_factory=lambda: [WorkerPosition()])
    # An epoch-based stream's deal over ranks x workers (pretrain.engine.deal.Deal).
    deal: dict[str, Any] | None = None
    # Not saved: every old rank's saved state (read on access), when this run's layout
    # (ranks x workers) differs from theirs; the stream continues them on it (carry_over).
    carried: Sequence[StreamState] | None = None

    @property
    def skipped(self) -> int:
        return sum(w.bad_samples + w.bad_shards for w in self.workers)

    def to_dict(self) -> dict[str, Any]:
        return {"micro_batches": self.micro_batches, "workers": [asdict(w) for w in self.workers],
                "deal": self.deal}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamState:
        workers = [WorkerPosition(**w) for w in data["workers"]]
        return cls(micro_batches=int(data["micro_batches"]), workers=workers,
                   deal=data.get("deal"))

    @classmethod
    def on_new_layout(cls, saved: Sequence[dict[str, Any]]) -> StreamState:
        """The state a rank starts from when the run resumes on another layout: the stream
        re-deals ``saved`` (every old rank's state, by rank) to it."""
        return cls(workers=[], carried=_SavedStates(saved))

    @classmethod
    def fresh(cls, num_workers: int) -> StreamState:
        return cls(workers=[WorkerPosition() for _ in range(max(1, num_workers))])


class _SavedStates(Sequence):
    """Old ranks' saved states, each converted when first used (a shard stream's new rank
    needs only the old ranks whose slots it continues)."""

    def __init__(self, saved: Sequence[dict[str, Any]]) -> None:
        self.saved, self.cache = saved, {}

    def __len__(self) -> int:
        return len(self.saved)

    def __getitem__(self, rank: int) -> StreamState:
        if rank not in self.cache:
            self.cache[rank] = StreamState.from_dict(self.saved[rank])
        return self.cache[rank]


@dataclass
class Item:
    """One item a worker takes from its stream."""

    source: Any  # what the stream's load_item reads: an image index, an image id, a raw sample
    seed: int  # what its augmentation's randomness is seeded from
    consumed: int  # the worker's position once it has taken this item
    # The batch ends with this item however many of its items loaded (detection's aspect
    # groups); otherwise a batch ends once ``batch_size`` items have loaded.
    ends_batch: bool = False


class StreamGaveUp(Exception):
    """The stream can no longer yield a batch; the message is the run's one last line."""


class WorkerPass:
    """One logical worker's pass over its stream from its saved position: the items it takes,
    in order, and the counts its batches' positions carry. Failed items are counted; this
    base never gives up (a stream with a rule extends :meth:`failed` or :meth:`loaded`)."""

    def __init__(self, items: Iterable[Item], start: WorkerPosition) -> None:
        self.items = items
        self.bad_samples = start.bad_samples

    def loaded(self, item: Item) -> None:
        """``item`` loaded (a sign of life for a give-up rule)."""

    def failed(self, item: Item, error: Exception) -> None:
        """``item`` could not be loaded: it is skipped and counted; raises
        :class:`StreamGaveUp` when the stream should end."""
        self.bad_samples += 1

    def position(self, consumed: int) -> WorkerPosition:
        """The worker's position after a batch whose last item left it at ``consumed``."""
        return WorkerPosition(consumed=consumed, bad_samples=self.bad_samples)


class FilePass(WorkerPass):
    """The pass of a stream that reads one file per item (ImageFolder, ADE-layout folders,
    COCO): it gives up after ``streak``'s failed reads in a row
    (:class:`pretrain.engine.read_failures.FailureStreak`), which lists each failure, by
    ``path_of(item.source)``, in the run's skip list."""

    def __init__(self, items: Iterable[Item], start: WorkerPosition, streak: FailureStreak,
                 path_of: Callable[[Any], Any]) -> None:
        super().__init__(items, start)
        self.streak, self.path_of = streak, path_of

    def loaded(self, item: Item) -> None:
        self.streak.succeeded()

    def failed(self, item: Item, error: Exception) -> None:
        super().failed(item, error)
        message = self.streak.failed(self.path_of(item.source), error)
        if message is not None:
            raise StreamGaveUp(message)


class ResumableStream(IterableDataset):
    """Endless, exactly resumable micro-batches for one rank (module docstring).

    A stream supplies :meth:`worker_pass` and :meth:`load_item`; ``collate(list of what
    load_item returned)`` turns a micro-batch into its dict.
    """

    def __init__(self, collate: Callable[[list[Any]], dict[str, Any]], batch_size: int,
                 seed: int, rank: int, num_workers: int, state: StreamState) -> None:
        super().__init__()
        self.collate = collate
        self.batch_size, self.seed, self.rank = batch_size, seed, rank
        self.num_workers = max(1, num_workers)
        self.state = state
        self._resolve_layout()

    def _resolve_layout(self) -> None:
        """A state carried from another layout is re-dealt to this one (:meth:`carry_over`),
        in place (the loader keeps the object)."""
        carried = self.state.carried
        if carried is not None:
            dealt = self.carry_over(carried)
            self.state.micro_batches, self.state.workers = dealt.micro_batches, dealt.workers
            self.state.deal, self.state.carried = dealt.deal, None
        if len(self.state.workers) != self.num_workers:
            raise ValueError("stream state was saved with a different number of data workers")

    def carry_over(self, saved: Sequence[StreamState]) -> StreamState:
        """This rank's state on this layout, continuing ``saved`` (every old rank's)."""
        raise ValueError(f"{type(self).__name__} cannot continue on another layout")

    @abstractmethod
    def worker_pass(self, worker: int, start: WorkerPosition) -> WorkerPass:
        """The items logical worker ``worker`` takes from ``start`` on, each with its seed and
        the position after it, with the stream's counts and give-up rule; resuming must cost
        no decoding."""

    @abstractmethod
    def load_item(self, item: Item) -> Any:
        """Read and augment one item, raising on bad data (skipped and counted); runs with
        torch's CPU generator and Python's ``random`` seeded from ``item.seed``."""

    def logical_worker(self) -> int:
        """The logical worker this DataLoader worker plays. TrainLoader hands out batches
        round-robin from physical worker 0; after a resume at micro-batch m the next batch is
        logical worker m's."""
        info = get_worker_info()
        physical = info.id if info is not None else 0
        return (physical + self.state.micro_batches) % self.num_workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Batches; once the stream gives up, one :func:`stream_error` item instead, then the
        end (a worker's exception would reach the main process as a traceback; this reaches
        it as a message :class:`TrainLoader` raises)."""
        worker = self.logical_worker()
        try:
            yield from self._batches(worker)
        except StreamGaveUp as error:
            yield stream_error(str(error))

    def _batches(self, worker: int) -> Iterator[dict[str, Any]]:
        reads = self.worker_pass(worker, self.state.workers[worker])
        loaded: list[Any] = []
        for item in reads.items:
            try:
                with seeded_rngs(item.seed):
                    loaded.append(self.load_item(item))
            except Exception as error:  # any unreadable item is skipped and counted, never fatal
                reads.failed(item, error)
            else:
                reads.loaded(item)
            if len(loaded) == self.batch_size or item.ends_batch:
                if loaded:  # an aspect group whose every image failed yields no batch
                    position = reads.position(item.consumed)
                    yield {**self.collate(loaded), "worker": worker, "position": asdict(position)}
                loaded = []


class FileStream(ResumableStream):
    """A stream that reads one file per item, over an endless sequence of items (epoch after
    epoch) dealt like cards to ranks and workers: item ``g`` to slot ``g mod (ranks x
    workers)``, so within an epoch no file is read twice across them. It gives up after a
    :class:`pretrain.engine.read_failures.FailureStreak` of failed reads (``files``: the
    split's size; ``source``: the config field and folder the message names). A stream
    supplies :meth:`items`, :meth:`item_path` and :meth:`load_item`."""

    def __init__(self, collate: Callable[[list[Any]], dict[str, Any]], batch_size: int,
                 seed: int, rank: int, world_size: int, num_workers: int, state: StreamState,
                 files: int, source: str, skips: SkipLog | None) -> None:
        self.world_size, self.files = world_size, files  # carry_over needs the layout
        super().__init__(collate, batch_size, seed, rank, num_workers, state)
        self.source, self.skips = source, skips
        slots = world_size * self.num_workers
        self.deal = Deal.from_dict(state.deal) if state.deal is not None else Deal(slots)
        if self.deal.slots != slots:
            raise ValueError(f"stream state was dealt over {self.deal.slots} slots, not "
                             f"{world_size} ranks x {self.num_workers} workers")
        state.deal = self.deal.to_dict()

    def dealt(self, worker: int, taken: int) -> int:
        """The index in the endless sequence of a worker's ``taken``-th item (its lane's
        position; :mod:`pretrain.engine.deal`)."""
        return self.deal.position(self.rank * self.num_workers + worker, taken)

    def lane(self, worker: int, start: int = 0) -> Iterator[tuple[int, int]]:
        """``(taken, index)`` of a worker's items from its ``start``-th step on, stepping over
        the positions a run on an earlier layout already read."""
        for taken in itertools.count(start):
            index = self.dealt(worker, taken)
            if not self.deal.taken_earlier(index):
                yield taken, index

    def carry_over(self, saved: Sequence[StreamState]) -> StreamState:
        """The epoch continues on the new layout: :func:`pretrain.engine.deal.redeal` starts a
        deal over this layout's slots where the old slots left off, so every item of the
        epoch is still read once. Skip counts stay with the slot of the same number (folded
        onto the new slots when there are fewer)."""
        old = [position for state in saved for position in state.workers]
        deal = Deal.from_dict(saved[0].deal) if saved[0].deal is not None else Deal(len(old))
        slots = self.world_size * self.num_workers
        deal = redeal(deal, [position.consumed for position in old], slots)
        workers = [WorkerPosition() for _ in range(self.num_workers)]
        for slot, position in enumerate(old):
            if slot % slots // self.num_workers == self.rank:
                workers[slot % slots % self.num_workers].bad_samples += position.bad_samples
        return StreamState(micro_batches=0, workers=workers, deal=deal.to_dict())

    def worker_pass(self, worker: int, start: WorkerPosition) -> FilePass:
        streak = FailureStreak("train", self.source, self.files, self.skips)
        return FilePass(self.items(worker, start.consumed), start, streak, self.item_path)

    @abstractmethod
    def items(self, worker: int, consumed: int) -> Iterator[Item]:
        """A worker's items from its ``consumed``-th on (see :meth:`dealt`)."""

    @abstractmethod
    def item_path(self, source: Any) -> Any:
        """The file an item's source names, for the skip list and the give-up line."""


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
    """Rank ``rank``'s stream position on resume, from every old rank's saved stream state
    (``saved_streams[r]``: old rank ``r``'s :meth:`StreamState.to_dict`, read from its file on
    first access). On the same layout (world size and data workers per rank) the rank
    continues exactly its own position; on another, the stream re-deals them to the new layout
    when it is built (:meth:`ResumableStream.carry_over`, which reads only the old ranks it
    needs; the guarantee is in docs/cluster.md)."""
    if len(saved_streams) != old_world:
        raise ValueError(f"the checkpoint holds {len(saved_streams)} ranks' stream positions, "
                         f"expected {old_world}")
    if world == old_world:
        state = StreamState.from_dict(saved_streams[rank])
        if len(state.workers) == max(1, workers):
            return state
    return StreamState.on_new_layout(saved_streams)
