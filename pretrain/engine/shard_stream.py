"""The shard stream: weighted shard sets -> decoded, augmented batches (pretraining's image-text
pairs, classification's labelled shards).

Design points:

* Shards are drawn with replacement from the mixture by a generator seeded per (seed, rank,
  worker), so every rank and worker has an endless stream whatever the number of shards, and
  every rank runs the same number of steps (no hang when shards < ranks x workers).
* The stream is exactly resumable. Everything random is seeded: the shard draw, the shuffle
  buffer, and each sample's augmentation (seeded from its index in the worker's stream). A
  worker's position is therefore one number, ``consumed`` (samples taken from its shuffled
  stream); on resume the worker replays its stream up to that point *without decoding*, which
  reproduces the shuffle buffer and costs only tar reading. What every stream shares (the
  logical workers, the seeding, the batches' positions, giving up in one line) is
  :class:`pretrain.engine.stream.ResumableStream`'s.
* Bad samples (undecodable image, missing caption, unreadable shard) are skipped and counted;
  the counts travel with every batch and are logged.
* Shards may be remote (``http(s)://``, ``s3://``, ``pipe:``; :mod:`data_tools.remote`): every
  wait is bounded by ``data.remote``. A shard that cannot be read within it is skipped,
  counted, named on stderr and in ``RUN_DIR/skipped.jsonl``, and never opened again by that
  worker: later draws of it are skipped at once, and the set of such shards (with the draw
  that gave up on each) is part of the worker's saved position, so a resumed run neither
  waits for it again nor draws differently. (A shard that broke mid-way had yielded some
  samples; a resumed run skips it whole from that draw on, so its replay can differ there.)
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
import random
import sys
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import braceexpand
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from data_tools.mixture import ShardSet, draw_shards, drawable_shards
from data_tools.remote import RemotePolicy, ShardUnavailable, describe_error, open_shard
from pretrain.engine.random_draws import item_seed
from pretrain.engine.read_failures import GIVE_UP_AFTER_FAILURES
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

    Everything counts from the set's last sign of life (a good sample; while replaying to a
    resume point, any sample): which of its shards were drawn, how many samples were read from
    them, how many of its samples failed to decode. Draws are in order with the reads (a shard
    is read to its end before the next draw), decodes lag behind by the shuffle buffer, which
    is why a raw sample is tagged with its set.
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

    def worker_pass(self, worker: int, start: WorkerPosition) -> WorkerPass:
        return _ShardPass(self, worker, start)

    def load_item(self, item: Item) -> tuple:
        return self.decode(item.source.sample)

    def shuffled_samples(self, worker: int, errors: _ShardErrors,
                         watch: _SetWatch) -> Iterator[dict]:
        """A logical worker's endless stream of raw samples: its shard draws, read through
        ``errors`` and tagged by ``watch``, then shuffled; the same on every pass."""
        shard_rng = random.Random(f"shards-{self.seed}-{self.rank}-{worker}")
        urls = _watched_draws(self.shard_sets, shard_rng, watch)
        files = tar_file_expander(self._opened(urls, errors), handler=errors)
        samples = (watch.tag(sample) for sample in group_by_keys(files, handler=errors))
        shuffle_rng = random.Random(f"shuffle-{self.seed}-{self.rank}-{worker}")
        return wds.shuffle(self.shuffle_buffer, self.shuffle_initial, rng=shuffle_rng)(samples)

    def _opened(self, draws: Iterator[dict[str, str]],
                errors: _ShardErrors) -> Iterator[dict[str, Any]]:
        """The drawn shards, opened within :attr:`remote`'s bounds; each closed once it has
        been read (the expander reads a shard to its end before asking for the next)."""
        for draw, source in enumerate(draws):
            url = source["url"]
            if draw >= errors.dead.get(url, draw + 1):
                continue  # given up on at an earlier draw: reported then, not waited for again
            errors.opening()
            try:
                raw = open_shard(url, self.remote)
            except ShardUnavailable as error:
                errors.shard_failed(url, error.reason, draw)
                continue
            stream = _ReportingStream(raw, url, draw, errors)
            try:
                yield {"url": url, "stream": stream}
            finally:
                stream.close()


class _ShardPass(WorkerPass):
    """A worker's pass over its shard stream: it replays its stream up to the saved position
    without decoding, counts unreadable shards and tar members, remembers the shards given up
    on, and gives up on a shard set per :class:`_SetWatch`."""

    def __init__(self, stream: ShardStream, worker: int, start: WorkerPosition) -> None:
        self.start = start
        self.dead = dict(start.dead_shards)
        self.errors = _ShardErrors(stream.skip_log, stream.rank, self.dead)
        self.watch = _SetWatch(stream.shard_sets)
        # Shard errors met while replaying were counted in the saved state, up to the sample
        # the saved position ends at (the same point of the same stream).
        self.bad_shards_before_resume = 0
        super().__init__(self._items(stream, worker), start)

    def _items(self, stream: ShardStream, worker: int) -> Iterator[Item]:
        samples = stream.shuffled_samples(worker, self.errors, self.watch)
        for index, sample in enumerate(samples):
            set_index = sample.pop(_SET_KEY)
            if index < self.start.consumed:
                self.watch.alive(set_index)  # it was in the stream before the resume point
                self.bad_shards_before_resume = self.errors.count
                continue  # replaying up to the resume point: no decoding
            yield Item(_Drawn(set_index, sample),
                       seed=item_seed(stream.seed, stream.rank, worker, index),
                       consumed=index + 1)

    def loaded(self, item: Item) -> None:
        self.watch.alive(item.source.set_index)

    def failed(self, item: Item, error: Exception) -> None:
        super().failed(item, error)
        self.watch.failed_to_decode(item.source.set_index)

    def position(self, consumed: int) -> WorkerPosition:
        bad_shards = self.start.bad_shards + self.errors.count - self.bad_shards_before_resume
        return WorkerPosition(consumed=consumed, bad_samples=self.bad_samples,
                              bad_shards=bad_shards, dead_shards=dict(self.dead))


def _watched_draws(shard_sets: list[ShardSet], rng: random.Random,
                   watch: _SetWatch) -> Iterator[dict[str, str]]:
    for set_index, url in draw_shards(shard_sets, rng):
        watch.drew(set_index, url)
        yield {"url": url}

