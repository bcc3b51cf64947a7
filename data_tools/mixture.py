"""Weighted mixtures of shard sets.

A mixture is a list of shard sets, each a brace pattern and a weight, e.g. in a pretraining
config::

    data:
      train:
        - {shards: "/data/laion/{00000..41407}.tar", weight: 0.7}
        - {shards: "/data/coyo/{00000..74999}.tar", weight: 0.3}

or a YAML file holding that list (``data.train: mixture.yaml``). A set is chosen with
probability proportional to its weight, then one of its shards with probability proportional
to the shard's sample count (read from the set's ``sizes.json``, else from each shard's
``_stats.json`` as img2dataset writes them; uniform when neither is there), so the weights are
fractions of *samples* drawn, not of shards. Remote sets (``http(s)://``, ``s3://``; see
:mod:`data_tools.remote`) read the ``sizes.json`` beside their shards when there is one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import yaml

from data_tools.remote import RemotePolicy, ShardUnavailable, describe_error, is_local, open_shard


@dataclass(frozen=True)
class ShardSet:
    """One shard set of a mixture: its shard URLs, their sample counts and its weight."""

    pattern: str
    weight: float
    urls: tuple[str, ...]
    sizes: tuple[int, ...] | None

    @property
    def num_samples(self) -> int | None:
        return sum(self.sizes) if self.sizes is not None else None


def _read_sizes(urls: tuple[str, ...]) -> tuple[int, ...] | None:
    """Sample counts per shard, or None (uniform draws) when some shard's count is unknown.

    A shard's count comes from ``sizes.json`` beside it, else from its ``_stats.json``
    (``successes``: img2dataset writes no ``sizes.json``, and its ``count`` is the number of
    download attempts, failures included).
    """
    listed: dict[Path, dict[str, int]] = {}
    counts = []
    for url in urls:
        path = Path(url)
        if path.parent not in listed:
            listed[path.parent] = _sizes_file(path.parent / "sizes.json")
        count = listed[path.parent].get(path.name)
        if count is None:
            count = stats_count(path)
        if count is None:
            return None
        counts.append(count)
    return tuple(counts)


def _sizes_file(sizes_file: Path) -> dict[str, int]:
    if not sizes_file.is_file():
        return {}
    try:
        sizes = json.loads(sizes_file.read_text(encoding="utf-8"))
        return {str(name): int(count) for name, count in sizes.items()}
    except (OSError, ValueError, AttributeError, TypeError) as error:
        raise ValueError(f"{sizes_file}: unreadable ({error})") from None


def stats_count(shard: Path) -> int | None:
    """Samples written to ``shard`` according to its ``_stats.json``, or None without one."""
    stats_file = shard.with_name(shard.name.removesuffix(".tar") + "_stats.json")
    try:
        stats = json.loads(stats_file.read_text(encoding="utf-8"))
        return int(stats["successes"] if "successes" in stats else stats["count"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def shard_set(pattern: str, weight: float = 1.0,
              remote: RemotePolicy | None = None) -> ShardSet:
    """Expand a brace pattern into a :class:`ShardSet`; local shards must exist."""
    if weight <= 0:
        raise ValueError(f"shard set {pattern!r}: weight must be > 0, got {weight}")
    urls = tuple(braceexpand.braceexpand(pattern))
    local = [u for u in urls if is_local(u)]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(
            f"shard set {pattern!r}: {len(missing)} of {len(urls)} shards missing, "
            f"e.g. {missing[0]}"
        )
    if len(local) == len(urls):
        sizes = _read_sizes(urls)
    else:
        sizes = _remote_sizes(pattern, urls, remote or RemotePolicy())
    return ShardSet(pattern=pattern, weight=float(weight), urls=urls, sizes=sizes)


def _remote_sizes(pattern: str, urls: tuple[str, ...],
                  policy: RemotePolicy) -> tuple[int, ...] | None:
    """Sample counts from the ``sizes.json`` beside remote shards (one request per folder),
    or None when a folder has none or a shard is missing from it (uniform draws then).
    ``pipe:`` shards have no folder to look in."""
    folders: dict[str, dict[str, int] | None] = {}
    counts = []
    for url in urls:
        folder, _, name = url.rpartition("/")
        if url.startswith("pipe:") or not folder:
            return None
        if folder not in folders:
            folders[folder] = _remote_sizes_file(pattern, f"{folder}/sizes.json", policy)
        count = (folders[folder] or {}).get(name)
        if count is None:
            return None
        counts.append(count)
    return tuple(counts)


def _remote_sizes_file(pattern: str, url: str, policy: RemotePolicy) -> dict[str, int] | None:
    try:
        stream = open_shard(url, dataclasses.replace(policy, retries=0))
    except ShardUnavailable:
        return None  # no sizes.json there (or not reachable: --check probes the shards)
    try:
        body = stream.read()
    except Exception:  # the transport broke: as if there were none (draws are uniform then)
        return None
    finally:
        stream.close()
    try:
        sizes = json.loads(body)
        return {str(name): int(count) for name, count in sizes.items()}
    except (ValueError, AttributeError, TypeError) as error:  # not the mapping it should be
        raise ValueError(f"shard set {pattern!r}: {url} unreadable "
                         f"({describe_error(error)})") from None


def check_samples(sets: list[ShardSet], remote: RemotePolicy | None = None,
                  probe_shards: int = 4) -> None:
    """Raise ``ValueError`` (one line naming the set) when a set cannot yield a single sample.

    Cheap enough for every start-up: it uses the known sample counts (``sizes.json`` or the
    shards' ``_stats.json``) and otherwise reads each local shard's first 512 bytes, stopping at
    the first shard that has a member. A 0-byte shard is never a tar and is refused outright.
    Draws from a set without samples would never yield a batch: training would hang at step 0.
    Of a remote set, ``probe_shards`` shards spread over it are opened within ``remote``'s
    bounds and their first 512 bytes read: each must be reachable and start with a tar header.
    """
    for shard_set_ in sets:
        _probe_remote(shard_set_, remote or RemotePolicy(), probe_shards)
        local = [u for u in shard_set_.urls if is_local(u)]
        empty_files = [u for u in local if os.path.getsize(u) == 0]
        if empty_files:
            raise ValueError(f"shard set {shard_set_.pattern!r}: {len(empty_files)} of "
                             f"{len(shard_set_.urls)} shards are 0 bytes (not tars), "
                             f"e.g. {empty_files[0]}")
        where = _why_empty(shard_set_, local)
        if where:
            raise ValueError(f"shard set {shard_set_.pattern!r} has no samples: {where}")


def _why_empty(shard_set_: ShardSet, local: list[str]) -> str | None:
    count = len(shard_set_.urls)
    if shard_set_.sizes is not None:
        if sum(shard_set_.sizes) == 0:
            return f"sizes.json / _stats.json count 0 samples in each of its {count} shards"
        return None
    if len(local) == len(shard_set_.urls) and not any(map(_has_member, local)):
        return (f"each of its {count} shards is an empty tar (no member header in its first "
                "512 bytes)")
    return None


def _probe_remote(shard_set_: ShardSet, policy: RemotePolicy, count: int) -> None:
    remote = [u for u in shard_set_.urls if not is_local(u)]
    if not remote or count == 0:
        return
    probed = remote[:: max(1, len(remote) // count)][:count]
    failures = []
    for url in probed:
        try:
            block = _first_block(url, policy)
        except (ShardUnavailable, OSError) as error:
            failures.append((url, getattr(error, "reason", None) or describe_error(error)))
            continue
        if not _is_tar_header(block):
            failures.append((url, "not a tar (no member header in its first 512 bytes)"))
    if failures:
        url, reason = failures[0]
        raise ValueError(f"shard set {shard_set_.pattern!r}: {len(failures)} of {len(probed)} "
                         f"probed remote shards unusable, e.g. {url}: {reason}")


def _first_block(url: str, policy: RemotePolicy) -> bytes:
    stream = open_shard(url, policy)
    try:
        block = b""
        while len(block) < tarfile.BLOCKSIZE:
            try:
                data = stream.read(tarfile.BLOCKSIZE - len(block))
            except Exception as error:  # the transport's own errors: a stall, a reset
                raise OSError(describe_error(error)) from None
            if not data:
                break
            block += data
        return block
    finally:
        stream.close()


def _has_member(path: str) -> bool:
    """Whether the tar's first 512-byte block is a member header (not end-of-archive zeros)."""
    with open(path, "rb") as handle:
        return _is_tar_header(handle.read(tarfile.BLOCKSIZE))


def _is_tar_header(block: bytes) -> bool:
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def load_mixture(spec: str | Path | list, remote: RemotePolicy | None = None) -> list[ShardSet]:
    """Build a mixture from a pattern, a YAML file of ``{shards, weight}`` items, or such a
    list; ``remote`` bounds the reads of remote sets' ``sizes.json``."""
    if isinstance(spec, str | Path) and str(spec).endswith((".yaml", ".yml")):
        spec = yaml.safe_load(Path(spec).read_text())
    if isinstance(spec, str | Path):
        return [shard_set(str(spec), remote=remote)]
    if not isinstance(spec, list) or not spec:
        raise ValueError("a mixture is a non-empty list of {shards: PATTERN, weight: W} items")
    sets = []
    for item in spec:
        if isinstance(item, str):
            sets.append(shard_set(item, remote=remote))
        elif isinstance(item, dict) and set(item) <= {"shards", "weight"} and "shards" in item:
            sets.append(shard_set(str(item["shards"]), float(item.get("weight", 1.0)), remote))
        else:
            raise ValueError(f"mixture item {item!r}: expected {{shards: PATTERN, weight: W}}")
    return sets


def sample_shards(sets: list[ShardSet], rng: random.Random) -> Iterator[str]:
    """Endless stream of shard URLs drawn with replacement according to the mixture.

    Drawing with replacement is what keeps every rank and worker busy for any number of
    shards (fewer shards than ranks x workers would otherwise starve some of them and hang
    the collective ops of the others).
    """
    for _, url in draw_shards(sets, rng):
        yield url


def draw_shards(sets: list[ShardSet], rng: random.Random) -> Iterator[tuple[int, str]]:
    """:func:`sample_shards` with the index of the set each URL was drawn from (the same
    draws from the same ``rng``)."""
    set_weights = [s.weight for s in sets]
    indices = range(len(sets))
    while True:
        chosen = rng.choices(indices, weights=set_weights)[0]
        yield chosen, rng.choices(sets[chosen].urls, weights=sets[chosen].sizes)[0]


def drawable_shards(shard_set_: ShardSet) -> int:
    """How many distinct shards of the set can be drawn (a shard counted 0 samples never is)."""
    if shard_set_.sizes is None:
        return len(set(shard_set_.urls))
    return len({u for u, n in zip(shard_set_.urls, shard_set_.sizes, strict=True) if n > 0})
