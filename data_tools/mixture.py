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
fractions of *samples* drawn, not of shards.
"""

from __future__ import annotations

import json
import os
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import yaml


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


def shard_set(pattern: str, weight: float = 1.0) -> ShardSet:
    """Expand a brace pattern into a :class:`ShardSet`; local shards must exist."""
    if weight <= 0:
        raise ValueError(f"shard set {pattern!r}: weight must be > 0, got {weight}")
    urls = tuple(braceexpand.braceexpand(pattern))
    local = [u for u in urls if _is_local(u)]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(
            f"shard set {pattern!r}: {len(missing)} of {len(urls)} shards missing, "
            f"e.g. {missing[0]}"
        )
    sizes = _read_sizes(urls) if len(local) == len(urls) else None
    return ShardSet(pattern=pattern, weight=float(weight), urls=urls, sizes=sizes)


def check_samples(sets: list[ShardSet]) -> None:
    """Raise ``ValueError`` (one line naming the set) when a set cannot yield a single sample.

    Cheap enough for every start-up: it uses the known sample counts (``sizes.json`` or the
    shards' ``_stats.json``) and otherwise reads each local shard's first 512 bytes, stopping at
    the first shard that has a member. A 0-byte shard is never a tar and is refused outright.
    Draws from a set without samples would never yield a batch: training would hang at step 0.
    """
    for shard_set_ in sets:
        local = [u for u in shard_set_.urls if _is_local(u)]
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


def _has_member(path: str) -> bool:
    """Whether the tar's first 512-byte block is a member header (not end-of-archive zeros)."""
    with open(path, "rb") as handle:
        block = handle.read(tarfile.BLOCKSIZE)
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def load_mixture(spec: str | Path | list) -> list[ShardSet]:
    """Build a mixture from a pattern, a YAML file of ``{shards, weight}`` items, or such a list."""
    if isinstance(spec, str | Path) and str(spec).endswith((".yaml", ".yml")):
        spec = yaml.safe_load(Path(spec).read_text())
    if isinstance(spec, str | Path):
        return [shard_set(str(spec))]
    if not isinstance(spec, list) or not spec:
        raise ValueError("a mixture is a non-empty list of {shards: PATTERN, weight: W} items")
    sets = []
    for item in spec:
        if isinstance(item, str):
            sets.append(shard_set(item))
        elif isinstance(item, dict) and set(item) <= {"shards", "weight"} and "shards" in item:
            sets.append(shard_set(str(item["shards"]), float(item.get("weight", 1.0))))
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
