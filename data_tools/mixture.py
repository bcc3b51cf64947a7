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
import random
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
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(
            f"shard set {pattern!r}: {len(missing)} of {len(urls)} shards missing, "
            f"e.g. {missing[0]}"
        )
    sizes = _read_sizes(urls) if len(local) == len(urls) else None
    return ShardSet(pattern=pattern, weight=float(weight), urls=urls, sizes=sizes)


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
    set_weights = [s.weight for s in sets]
    while True:
        chosen = rng.choices(sets, weights=set_weights)[0]
        yield rng.choices(chosen.urls, weights=chosen.sizes)[0]
