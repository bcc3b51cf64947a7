"""The shard stream: weighted shard sets -> decoded, augmented batches (pretraining's image-text
pairs, classification's labelled shards).

Design points:

* Shards are drawn with replacement from the mixture by a generator seeded per (seed, rank,
  worker), so every rank and worker has an endless stream whatever the number of shards, and
  every rank runs the same number of steps (no hang when shards < ranks x workers).
* The stream is exactly resumable, in constant time. Everything random is seeded: the shard
  draw, the shuffle buffer (webdataset's algorithm, :mod:`pretrain.engine.shuffle`), and each
  sample's augmentation (seeded from its index in the worker's stream). A worker's position
  holds ``consumed`` (samples taken), the draw generator's state, the shard being read and how
  far, the shuffle generator's state and a reference to every sample in the shuffle buffer
  (draw, member, byte span in the tar). A resume refills the buffer from those references,
  reading a local shard's samples alone at their spans (a remote shard up to the last sample
  it needs), and goes on from there: it never re-reads what the worker consumed. What every
  stream shares (the logical workers, the seeding, the batches' positions, giving up in one
  line) is :class:`pretrain.engine.stream.ResumableStream`'s.
* Bad samples (undecodable image, missing caption, unreadable shard) are skipped and counted;
  the counts travel with every batch and are logged.
* Shards may be remote (``http(s)://``, ``s3://``, ``pipe:``; :mod:`data_tools.remote`): every
  wait is bounded by ``data.remote``. A shard that cannot be read within it is skipped,
  counted, named on stderr and in ``RUN_DIR/skipped.jsonl``, and never opened again by that
  worker: later draws of it are skipped at once, and the set of such shards (with the draw
  that gave up on each) is part of the worker's saved position, so a resumed run neither
  waits for it again nor draws differently.
* A shard set that can no longer yield a sample ends the run instead of hanging it (drawing
  with replacement would otherwise loop forever without a batch): once every shard of the set
  (at most ``GIVE_UP_AFTER_SHARDS`` distinct ones) has been drawn since the set's last good
  sample, and those draws read no sample at all, or the last ``GIVE_UP_AFTER_FAILURES`` samples
  read from it all failed to decode. The worker hands the error to the rank's main process,
  where :class:`pretrain.engine.stream.TrainLoader` raises it as the engine's
  ``TrainingAborted``: one line, exit 1.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import random
import re
import sys
import tarfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import braceexpand
import torch
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from data_tools.mixture import ShardSet, draw_shards, drawable_shards
from data_tools.remote import (
    RemotePolicy,
    ShardUnavailable,
    describe_error,
    is_local,
    open_shard,
)
from pretrain.engine.random_draws import item_seed
from pretrain.engine.read_failures import GIVE_UP_AFTER_FAILURES
from pretrain.engine.shuffle import ShuffleBuffer, shuffled
from pretrain.engine.skipped import SkipLog
from pretrain.engine.stream import (
    Item,
    ResumableStream,
    StreamGaveUp,
    StreamState,
    WorkerPass,
    WorkerPosition,
)

# When a shard set is given up on (module docstring). 1000 bad samples in a row from a set
# whose every drawn shard was read is no longer bad luck: a set with 10% good shards passes
# 1000 draws without one of them with probability 0.9**1000 (1e-46).
GIVE_UP_AFTER_SHARDS = 1000  # GIVE_UP_AFTER_FAILURES: pretrain.engine.read_failures
_SET_KEY = "__set__"  # which set of the mixture a raw sample was drawn from


def ordered_dataset(pattern: str, remote: RemotePolicy | None = None) -> Iterator[dict]:
    """Every sample of a shard pattern exactly once, in order, in this process only (evaluation
    reads the whole split on one rank, so there is no node or worker splitting). Remote shards
    are read within ``remote``'s bounds; a shard that cannot be read raises (an evaluation
    that silently lost a shard would report other numbers)."""
    policy = remote or RemotePolicy()

    def opened() -> Iterator[dict[str, Any]]:
        for url in braceexpand.braceexpand(pattern):
            stream = open_shard(url, policy)
            try:
                yield {"url": url, "stream": stream}
            finally:
                stream.close()

    return group_by_keys(tar_file_expander(opened()))


class _ShardErrors:
    """Counts unreadable shards and tar members (as webdataset's error handler) and reports a
    shard given up on: once per shard, on stderr and in the skip list, and remembers it."""

    def __init__(self, skip_log: SkipLog, rank: int, dead: dict[str, int]) -> None:
        self.count = 0
        self.skip_log, self.rank, self.dead = skip_log, rank, dead
        self.current_reported = False  # the shard being read already failed and was counted

    def __call__(self, exn: Exception) -> bool:
        if not self.current_reported:
            self.count += 1
        return True

    def opening(self) -> None:
        self.current_reported = False

    def shard_failed(self, url: str, reason: str, draw: int) -> None:
        self.count += 1
        self.current_reported = True
        self.dead.setdefault(url, draw)
        self.skip_log.record("train", url, reason)
        print(f"rank {self.rank}: skipped shard {url}: {reason}", file=sys.stderr, flush=True)


class _ReportingStream:
    """A shard's byte stream that reports its first read failure (a stall past the read
    timeout, a reset mid-shard) and fails every later read at once."""

    def __init__(self, raw: Any, url: str, draw: int, errors: _ShardErrors) -> None:
        self.raw, self.url, self.draw, self.errors = raw, url, draw, errors
        self.failed = False

    def read(self, size: int = -1) -> bytes:
        if self.failed:
            raise OSError(f"{self.url}: already failed")
        try:
            return self.raw.read(size)
        except Exception as error:  # whatever the transport raises
            self.failed = True
            self.errors.shard_failed(self.url, f"failed mid-shard: {describe_error(error)}",
                                     self.draw)
            raise OSError(f"{self.url}: already failed") from None

    def close(self) -> None:
        with contextlib.suppress(Exception):  # a broken transport may fail to close as well
            self.raw.close()


class StreamStalled(StreamGaveUp):
    """A shard set of the stream can no longer yield a sample."""


class _SetWatch:
    """Notices a shard set that yields nothing, per the rule in the module docstring.

    Everything counts from the set's last sign of life (a good sample): which of its shards
    were drawn, how many samples were read from them, how many of its samples failed to
    decode. Draws are in order with the reads (a shard is read to its end before the next
    draw), decodes lag behind by the shuffle buffer, which is why a raw sample is tagged with
    its set.
    """

    def __init__(self, shard_sets: list[ShardSet]) -> None:
        self.sets = shard_sets
        self.needed = [min(drawable_shards(s), GIVE_UP_AFTER_SHARDS) for s in shard_sets]
        self.drawn: list[set[str]] = [set() for _ in shard_sets]
        self.read = [0] * len(shard_sets)
        self.failed = [0] * len(shard_sets)
        self.current: int | None = None
        for index, needed in enumerate(self.needed):
            if needed == 0:
                raise StreamStalled(f"shard set {shard_sets[index].pattern!r} has no samples: "
                                    "its sample counts are 0 for every shard")

    def drew(self, set_index: int, url: str) -> None:
        if self.current is not None and self.read[self.current] == 0:
            self._give_up_if_covered(self.current, "read no sample (empty or unreadable tars)")
        self.current = set_index
        self.drawn[set_index].add(url)

    def tag(self, sample: dict[str, Any]) -> dict[str, Any]:
        self.read[self.current] += 1
        sample[_SET_KEY] = self.current
        return sample

    def alive(self, set_index: int) -> None:
        self.drawn[set_index].clear()
        self.read[set_index] = self.failed[set_index] = 0

    def failed_to_decode(self, set_index: int) -> None:
        self.failed[set_index] += 1
        if self.failed[set_index] >= GIVE_UP_AFTER_FAILURES:
            self._give_up_if_covered(
                set_index, f"the last {self.failed[set_index]} samples read from them all "
                           "failed to decode")

    def _give_up_if_covered(self, set_index: int, what: str) -> None:
        drawn = len(self.drawn[set_index])
        if drawn >= self.needed[set_index]:
            shard_set = self.sets[set_index]
            raise StreamStalled(
                f"shard set {shard_set.pattern!r} yields no usable samples: {drawn} of its "
                f"{len(shard_set.urls)} shards were drawn since its last good sample and {what}"
                "; check it with python -m data_tools.inspect_shards")


class _Drawn(NamedTuple):
    """A raw sample and the set of the mixture it was drawn from."""

    set_index: int
    sample: dict[str, Any]


class ShardStream(ResumableStream):
    """Endless batches for one rank from a shard mixture; see the module docstring.

    ``decode(sample)`` turns one raw webdataset sample into a tuple of fields (raising on bad
    data, which is counted and skipped); it runs with the torch RNG and Python's ``random``
    seeded from the sample's position, so random augmentation is reproducible.
    ``collate(list_of_tuples)`` turns a full micro-batch into a dict of tensors.
    """

    def __init__(
        self,
        shard_sets: list[ShardSet],
        decode: Callable[[dict[str, Any]], tuple],
        collate: Callable[[list[tuple]], dict[str, torch.Tensor]],
        batch_size: int,
        seed: int,
        rank: int,
        num_workers: int,
        shuffle_buffer: int,
        shuffle_initial: int,
        state: StreamState,
        remote: RemotePolicy | None = None,
        skip_log: SkipLog | None = None,
    ) -> None:
        super().__init__(collate, batch_size, seed, rank, num_workers, state)
        self.shard_sets = shard_sets
        self.decode = decode
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_initial = min(shuffle_initial, shuffle_buffer)
        self.remote = remote or RemotePolicy()
        self.skip_log = skip_log or SkipLog(None)
        for position in self.state.workers:
            if position.consumed and position.resume is None:
                raise ValueError("the checkpoint's data position was saved by an older version "
                                 "of the shard stream (no resume point); start the run anew")

    def worker_pass(self, worker: int, start: WorkerPosition) -> WorkerPass:
        return _ShardPass(self, worker, start)

    def load_item(self, item: Item) -> tuple:
        return self.decode(item.source.sample)

    def identity(self, worker: int, start: WorkerPosition) -> tuple[int, int]:
        """What a logical worker's stream is seeded from: (rank, worker) of the run that began
        it (kept when a resume on another layout continues it elsewhere)."""
        return tuple(start.stream) if start.stream is not None else (self.rank, worker)

    def carry_over(self, saved: Sequence[StreamState]) -> StreamState:
        """This rank's positions on a new layout (ranks x workers): slot ``j`` continues the
        old layout's slot ``j`` (its draws, shuffle buffer and seeds, exactly); a slot the old
        layout lacked begins a new stream, seeded apart from every earlier one by the number
        of micro-batches at the change; an old slot beyond the new layout ends there (the
        samples waiting in its shuffle buffer are not read: with shards drawn with
        replacement that changes no guarantee, and nothing is ever read twice)."""
        per_rank = len(saved[0].workers)
        generation = saved[0].micro_batches
        first = self.rank * self.num_workers
        workers = []
        for slot in range(first, first + self.num_workers):
            if slot < len(saved) * per_rank:
                origin, worker = divmod(slot, per_rank)
                position = saved[origin].workers[worker]
                position.stream = position.stream or [origin, worker]
                workers.append(position)
            else:
                workers.append(WorkerPosition(stream=[-1 - generation, slot]))
        return StreamState(micro_batches=0, workers=workers)


_REF_KEY = "__ref__"  # [draw, member, first byte, end byte]: where a resume finds a sample again
_SPAN = "__span__"  # the bytes of a shard a sample's tar members occupy
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata files, skipped as it skips them


def tar_samples(stream: Any, url: str, handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """The samples of one tar stream as webdataset's ``tar_file_expander`` + ``group_by_keys``
    make them (the same files skipped, the same keys, ``__key__`` and ``__url__``), each with
    the byte span its members occupy (``__span__``). A read error ends the shard through
    ``handler``, as webdataset's does."""
    current: dict[str, Any] | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as archive:
            for info in archive:
                name = info.name
                if not info.isreg() or name is None or re.match(_META, name):
                    continue
                prefix, suffix = base_plus_ext(name)
                if prefix is None:
                    continue
                end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                data = archive.extractfile(info).read()
                archive.members = []  # streaming: keep no index of what was read
                if current is None or prefix != current["__key__"]:
                    if current is not None:
                        yield current
                    current = {"__key__": prefix, "__url__": url, _SPAN: [info.offset, end]}
                suffix = suffix.lower()
                if suffix in current:
                    handler(ValueError(f"{name}: duplicate file name in tar file {url}"))
                    continue
                current[suffix], current[_SPAN][1] = data, end
    except Exception as error:  # a truncated or corrupt tar: counted, the shard ends here
        handler(error)
    if current is not None:
        yield current


class _Reader:
    """A logical worker's shard draws, read one shard after another, knowing where it is: the
    draws made, the generator's state and the members read of the current shard. Every raw
    sample is tagged with its set and its (draw, member) reference."""

    def __init__(self, stream: ShardStream, identity: tuple[int, int], errors: _ShardErrors,
                 watch: _SetWatch, saved: dict[str, Any] | None) -> None:
        self.stream, self.errors, self.watch = stream, errors, watch
        self.rng = random.Random(f"shards-{stream.seed}-{identity[0]}-{identity[1]}")
        self.draws = 0
        self.current: list[Any] | None = None  # [draw, url, set index, members read]
        if saved is not None:
            self.rng.setstate(_rng_state(saved["draw_rng"]))
            self.draws, self.current = int(saved["draws"]), saved["current"]
        self._draws = draw_shards(stream.shard_sets, self.rng)

    def snapshot(self) -> dict[str, Any]:
        current = list(self.current) if self.current is not None else None
        return {"draws": self.draws, "draw_rng": self.rng.getstate(), "current": current}

    def members(self, draw: int, url: str, set_index: int) -> Iterator[tuple[int, dict]]:
        """One shard's samples with their member indices, read within the remote bounds."""
        self.errors.opening()
        try:
            raw = open_shard(url, self.stream.remote)
        except ShardUnavailable as error:
            self.errors.shard_failed(url, error.reason, draw)
            return
        source = _ReportingStream(raw, url, draw, self.errors)
        try:
            for member, sample in enumerate(tar_samples(source, url, self.errors)):
                sample[_SET_KEY], sample[_REF_KEY] = set_index, [draw, member, *sample.pop(_SPAN)]
                yield member, sample
        finally:
            source.close()

    def member_at(self, url: str, span: list[int]) -> dict | None:
        """The sample whose tar members lie at ``span`` (bytes) of a local shard, read alone;
        None when it cannot be read any more."""
        try:
            with open(url, "rb") as shard:
                shard.seek(span[0])
                data = shard.read(span[1] - span[0])
            return next(tar_samples(io.BytesIO(data), url, self.errors), None)
        except OSError:
            return None

    def samples(self, continuation: Iterator[tuple[int, dict]] | None) -> Iterator[dict]:
        """The samples from where the reader is: the rest of the current shard
        (``continuation``, positioned after its members read), then new draws."""
        if continuation is not None:
            self.watch.drew(self.current[2], self.current[1])
            yield from self._counted(continuation)
        while True:
            set_index, url = next(self._draws)
            draw, self.draws = self.draws, self.draws + 1
            self.watch.drew(set_index, url)
            self.current = None
            if draw >= self.errors.dead.get(url, draw + 1):
                continue  # given up on at an earlier draw: reported then, not waited for again
            self.current = [draw, url, set_index, 0]
            yield from self._counted(self.members(draw, url, set_index))

    def _counted(self, members: Iterator[tuple[int, dict]]) -> Iterator[dict]:
        for member, sample in members:
            self.current[3] = member + 1
            yield self.watch.tag(sample)


class _ShardPass(WorkerPass):
    """A worker's pass over its shard stream from its saved resume point: the draws and the
    shuffle buffer as they were (the buffered samples re-read from their shards, the only
    reading a resume does), unreadable shards counted and remembered, and the give-up rule of
    :class:`_SetWatch`."""

    def __init__(self, stream: ShardStream, worker: int, start: WorkerPosition) -> None:
        self.start, self.stream = start, stream
        self.identity = stream.identity(worker, start)
        self.dead = dict(start.dead_shards)
        self.errors = _ShardErrors(stream.skip_log, stream.rank, self.dead)
        self.watch = _SetWatch(stream.shard_sets)
        saved = start.resume
        self.reader = _Reader(stream, self.identity, self.errors, self.watch,
                              saved["reader"] if saved else None)
        shuffle_rng = random.Random(
            f"shuffle-{stream.seed}-{self.identity[0]}-{self.identity[1]}")
        if saved:
            shuffle_rng.setstate(_rng_state(saved["shuffle_rng"]))
        self.buffer = ShuffleBuffer(stream.shuffle_buffer, stream.shuffle_initial, shuffle_rng)
        super().__init__(self._items(saved), start)

    def _items(self, saved: dict[str, Any] | None) -> Iterator[Item]:
        continuation = self._restore(saved) if saved else None
        samples = shuffled(self.reader.samples(continuation), self.buffer)
        for index, sample in enumerate(samples, start=self.start.consumed):
            set_index = sample.pop(_SET_KEY)
            sample.pop(_REF_KEY)
            yield Item(_Drawn(set_index, sample), consumed=index + 1,
                       seed=item_seed(self.stream.seed, *self.identity, index))

    def _restore(self, saved: dict[str, Any]) -> Iterator[tuple[int, dict]] | None:
        """Refill the shuffle buffer from its saved references: a sample of a local shard is
        read alone at its byte span; a remote shard is read up to its last sample wanted;
        the current shard up to its members read. Returns the current shard's remaining
        members."""
        shards = {int(draw): (url, int(set_index))
                  for draw, (url, set_index) in saved["shards"].items()}
        refs = [(int(ref[0]), int(ref[1]), [int(ref[2]), int(ref[3])]) for ref in saved["buffer"]]
        current = self.reader.current
        found: dict[tuple[int, int], dict] = {}
        wanted: dict[int, set[int]] = {}
        for draw, member, span in refs:
            url, set_index = shards[draw]
            if current is not None and draw == current[0]:
                wanted.setdefault(draw, set()).add(member)
            elif is_local(url):
                sample = self.reader.member_at(url, span)
                if sample is not None:
                    sample[_SET_KEY], sample[_REF_KEY] = set_index, [draw, member, *span]
                    sample.pop(_SPAN)
                    found[draw, member] = sample
            else:
                wanted.setdefault(draw, set()).add(member)
        for draw, members in sorted(wanted.items()):
            if current is not None and draw == current[0]:
                continue
            last = max(members)
            with contextlib.closing(self.reader.members(draw, *shards[draw])) as shard:
                for member, sample in shard:
                    if member in members:
                        found[draw, member] = sample
                    if member >= last:
                        break
        continuation = None
        if current is not None:
            draw, url, set_index, read = current
            continuation = self.reader.members(draw, url, set_index)
            members = wanted.get(draw, set())
            for member, sample in itertools.islice(continuation, read):
                if member in members:
                    found[draw, member] = sample
        self.buffer.items = [found[draw, member] for draw, member, _ in refs
                             if (draw, member) in found]
        self.bad_samples += len(refs) - len(self.buffer.items)  # their shards failed since
        return continuation

    def loaded(self, item: Item) -> None:
        self.watch.alive(item.source.set_index)

    def failed(self, item: Item, error: Exception) -> None:
        super().failed(item, error)
        self.watch.failed_to_decode(item.source.set_index)

    def position(self, consumed: int) -> WorkerPosition:
        # the shards the buffered samples came from, by draw: all a resume re-reads
        shards = {sample[_REF_KEY][0]: [sample["__url__"], sample[_SET_KEY]]
                  for sample in self.buffer.items}
        resume = {"reader": self.reader.snapshot(), "shuffle_rng": self.buffer.rng.getstate(),
                  "buffer": [list(sample[_REF_KEY]) for sample in self.buffer.items],
                  "shards": dict(sorted(shards.items()))}
        return WorkerPosition(consumed=consumed, bad_samples=self.bad_samples,
                              bad_shards=self.start.bad_shards + self.errors.count,
                              dead_shards=dict(self.dead), stream=list(self.identity),
                              resume=resume)


def _rng_state(saved: Any) -> tuple:
    """A ``random.Random`` state as ``getstate`` gave it, from its saved form (its tuples may
    have come back as lists)."""
    version, internal, gauss = saved
    return int(version), tuple(int(v) for v in internal), gauss
