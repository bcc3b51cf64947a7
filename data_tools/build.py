"""Build a shard set: enumerate inputs, cut them into shards, build the shards in workers.

Determinism. Items are enumerated in a stable order (sources/); shard ``i`` takes items
``[i*N, (i+1)*N)`` whatever the number of workers, and each worker writes whole shards, so the
shards do not depend on scheduling. A skipped item leaves its shard shorter than ``N`` (as in
img2dataset) rather than pulling the next item in, which would make every later shard depend on
every earlier decode.

Resume. A shard is done when its ``_stats.json`` exists, records this build's ``build_id`` (a
hash of the inputs and every option that changes shard content) and the size its tar still has;
it is then reused, anything else is rebuilt from scratch. Files are written under temporary
names and renamed when complete (shard_writer), so a build killed at any moment and re-run
produces the same shards as an uninterrupted one.

Dedup (``--dedup``). A pre-pass hashes every item's bytes, in parallel, and walks the digests
in input order: the first item holding a given content wins and later ones are skipped as
``duplicate``. The pre-pass is repeated on resume (it reads every input once more), which keeps
the decision identical to an uninterrupted build. Memory: one 16-byte digest per distinct
image, plus the duplicates' positions.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_tools.samples import ByteReader, SampleOptions, content_digest, make_sample
from data_tools.shard_writer import (
    MAX_SAMPLES_PER_SHARD,
    ShardWriter,
    read_stats,
    shard_pattern,
    tar_path,
    write_sizes,
)
from data_tools.skips import Skip
from data_tools.sources import InvocationError, Item, Source, SourceSpec, iter_items, open_source
from data_tools.workers import WorkerPool

# Bump when the shard content for the same inputs and options changes, so resume rebuilds.
FORMAT_VERSION = 1
SUMMARY_FILE = "summary.json"
LOCK_FILE = ".build.lock"  # held (flock) by the build writing the folder
_DIGEST_BYTES = 16
_PROGRESS_EVERY = 16


@dataclass(frozen=True)
class BuildConfig:
    inputs: tuple[SourceSpec, ...]
    output: Path
    samples_per_shard: int = MAX_SAMPLES_PER_SHARD
    sample: SampleOptions = field(default_factory=SampleOptions)
    dedup: bool = False
    workers: int = 1
    resume: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.samples_per_shard <= MAX_SAMPLES_PER_SHARD:
            raise InvocationError(f"--samples-per-shard must be in 1..{MAX_SAMPLES_PER_SHARD}")
        if self.workers < 1:
            raise InvocationError("--workers must be >= 1")
        if not self.inputs:
            raise InvocationError("at least one --input is required")


@dataclass(frozen=True)
class ShardTask:
    """Everything a worker needs to build one shard, independent of every other shard."""

    shard_index: int
    first_item: int
    items: tuple[Item, ...]
    duplicates: frozenset[int]
    options: SampleOptions
    output: str
    build_id: str


def build(config: BuildConfig) -> dict[str, Any]:
    """Build the shard set described by ``config`` and return the run summary."""
    started = time.monotonic()
    sources = [open_source(spec) for spec in config.inputs]
    output = _prepare_output(config.output, sources)
    build_id = fingerprint(config, sources)
    with _exclusive(output), WorkerPool(config.workers) as pool:
        duplicates = _find_duplicates(config, sources, pool) if config.dedup else {}
        shard_stats, resumed = _build_shards(config, sources, pool, build_id, duplicates, output)
        write_sizes(output, range(len(shard_stats)))
        summary = _summary(config, sources, build_id, shard_stats, resumed, started)
        summary["worker_start"] = pool.start_method
        (output / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n",
                                           encoding="utf-8")
    return summary


@contextmanager
def _exclusive(output: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``output`` for the whole build, or raise at once.

    Two builds writing one folder would interleave their shards and side files. The lock is
    ``flock`` on a file in the folder: the kernel drops it when the holder dies (kill -9
    included), so a stale lock never blocks a resume. Forked workers share it while they live.
    """
    handle = open(output / LOCK_FILE, "ab")  # noqa: SIM115 - held open for the whole build
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise InvocationError(f"another build is writing {output}") from None
    try:
        yield
    finally:
        handle.close()  # releases the lock


def fingerprint(config: BuildConfig, sources: list[Source]) -> str:
    """Identifies the shard content: inputs and every option that changes a shard's bytes."""
    image = {k: (repr(v) if isinstance(v, float) else v)  # inf is not JSON
             for k, v in asdict(config.sample.image).items()}
    description = {
        "version": FORMAT_VERSION,
        "inputs": [source.describe() for source in sources],
        "samples_per_shard": config.samples_per_shard,
        "image": image,
        "min_caption_length": config.sample.min_caption_length,
        "max_file_bytes": config.sample.max_file_bytes,
        "dedup": config.dedup,
    }
    encoded = json.dumps(description, sort_keys=True).encode("utf-8", "backslashreplace")
    return hashlib.sha256(encoded).hexdigest()[:16]


def _prepare_output(output: Path, sources: list[Source]) -> Path:
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / ".write-probe.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise InvocationError(f"output {output} is not a writable directory: {error}") from None
    resolved = output.resolve()
    for source in sources:
        for path in getattr(source, "paths", ()):
            if Path(path).resolve().parent == resolved:
                raise InvocationError(f"output {output} holds input shard {path}; choose another")
    return output


class _Progress(tqdm):
    """A tqdm bar without tqdm's monitor thread (it only tunes refresh rates of stalled bars);
    a leftover thread would make forking workers in a later build of this process unsafe."""

    monitor_interval = 0


def _chunks(items: Iterator[Item], size: int) -> Iterator[tuple[int, tuple[Item, ...]]]:
    index = 0
    while chunk := tuple(islice(items, size)):
        yield index, chunk
        index += 1


def _find_duplicates(config: BuildConfig, sources: list[Source],
                     pool: WorkerPool) -> dict[int, frozenset[int]]:
    """Positions, per shard, of items whose bytes an earlier item (in input order) holds."""
    chunks = _chunks(iter_items(sources), config.samples_per_shard)
    tasks = ((index, chunk, config.sample) for index, chunk in chunks)
    seen: set[bytes] = set()
    duplicates = {}
    bar = _Progress(desc="dedup: hashing", unit="img", disable=not config.progress)
    for index, digests in pool.ordered_map(hash_chunk, tasks, bar.update):
        positions = set()
        for position, digest in enumerate(digests):
            if digest is None:
                continue
            if digest in seen:
                positions.add(position)
            seen.add(digest)
        if positions:
            duplicates[index] = frozenset(positions)
    bar.close()
    return duplicates


def hash_chunk(task: tuple[int, tuple[Item, ...], SampleOptions],
               report: Callable[[int], None]) -> tuple[int, list[bytes | None]]:
    index, items, options = task
    reader = ByteReader()
    digests = []
    for position, item in enumerate(items, 1):
        digest = content_digest(item, options, reader)
        digests.append(None if digest is None else digest[:_DIGEST_BYTES])
        if position % _PROGRESS_EVERY == 0:
            report(_PROGRESS_EVERY)
    report(len(items) % _PROGRESS_EVERY)
    reader.close()
    return index, digests


def _build_shards(config: BuildConfig, sources: list[Source], pool: WorkerPool, build_id: str,
                  duplicates: dict[int, frozenset[int]],
                  output: Path) -> tuple[list[dict[str, Any]], set[int]]:
    stats: dict[int, dict[str, Any]] = {}
    resumed: set[int] = set()

    def tasks() -> Iterator[ShardTask]:
        for index, items in _chunks(iter_items(sources), config.samples_per_shard):
            done = _completed_stats(output, index, build_id) if config.resume else None
            if done is not None:
                stats[index] = done
                resumed.add(index)
                continue
            yield ShardTask(index, index * config.samples_per_shard, items,
                            duplicates.get(index, frozenset()), config.sample, str(output),
                            build_id)

    bar = _Progress(desc="building shards", unit="img", disable=not config.progress)
    for shard_stats in pool.unordered_map(build_shard, tasks(), bar.update):
        stats[_index(shard_stats)] = shard_stats
    bar.close()
    return [stats[index] for index in sorted(stats)], resumed


def _index(stats: dict[str, Any]) -> int:
    return int(stats["shard"])


def _completed_stats(output: Path, index: int, build_id: str) -> dict[str, Any] | None:
    """The stats of shard ``index`` if this build completed it and its tar is intact in size."""
    stats = read_stats(output, index)
    if stats is None or stats.get("build_id") != build_id:
        return None
    try:
        intact = tar_path(output, index).stat().st_size == stats.get("tar_bytes")
    except OSError:
        return None
    return stats if intact else None


def build_shard(task: ShardTask, report: Callable[[int], None]) -> dict[str, Any]:
    """Write one whole shard; bad items are skipped and counted by reason in its stats."""
    reader = ByteReader()
    skipped: Counter[str] = Counter()
    with ShardWriter(task.output, task.shard_index) as writer:
        for position, item in enumerate(task.items):
            try:
                sample = make_sample(item, task.options, reader, position in task.duplicates)
            except Skip as skip:
                skipped[skip.reason] += 1
            else:
                writer.add(sample)
            if (position + 1) % _PROGRESS_EVERY == 0:
                report(_PROGRESS_EVERY)
        report(len(task.items) % _PROGRESS_EVERY)
        reader.close()
        return writer.finish({
            "build_id": task.build_id,
            "first_input_item": task.first_item,
            "input_items": len(task.items),
            "failed": sum(skipped.values()),
            "skipped": dict(sorted(skipped.items())),
        })


def _summary(
    config: BuildConfig, sources: list[Source], build_id: str,
    shard_stats: list[dict[str, Any]], resumed: set[int], started: float,
) -> dict[str, Any]:
    skipped: Counter[str] = Counter()
    for stats in shard_stats:
        skipped.update(stats.get("skipped", {}))
    items = sum(int(s["input_items"]) for s in shard_stats)
    elapsed = time.monotonic() - started
    built_items = sum(int(s["input_items"]) for s in shard_stats if _index(s) not in resumed)
    return {
        "build_id": build_id,
        "output": str(config.output),
        "pattern": shard_pattern(config.output, len(shard_stats)) if shard_stats else None,
        "inputs": [source.describe() for source in sources],
        "shards": len(shard_stats),
        "resumed_shards": len(resumed),
        "input_items": items,
        "samples": sum(int(s["count"]) for s in shard_stats),
        "skipped": dict(sorted(skipped.items())),
        "stale_shards": _stale_shards(config.output, len(shard_stats)),
        "built_items": built_items,
        "elapsed_seconds": round(elapsed, 3),
        "items_per_second": round(built_items / elapsed, 1),
    }


def _stale_shards(output: Path, num_shards: int) -> list[str]:
    """Complete shards beyond this build's range: left by an earlier, larger build."""
    names = sorted(p.name for p in output.glob("*_stats.json"))
    return [n.removesuffix("_stats.json") + ".tar" for n in names
            if n.removesuffix("_stats.json").isdigit()
            and int(n.removesuffix("_stats.json")) >= num_shards]
