"""Write samples into WebDataset tar shards in img2dataset's layout.

Layout (img2dataset's, so open_clip and DataComp tooling read the shards):
``00000.tar, 00001.tar, ...``; 9-digit sample keys (5 digits of shard index, 4 of position
inside the shard); per sample ``.jpg``/``.png``/``.webp``, ``.txt`` and ``.json``; per shard a
``.parquet`` of the metadata and a ``_stats.json`` written last, whose
presence marks the shard complete; at the root ``sizes.json`` (shard basename -> samples).

Shards are byte-for-byte deterministic: every tar header field that could vary between runs
(mtime, owner, permissions) is fixed, and members are written in sample order.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from data_tools.files import atomic_write_bytes

SHARD_DIGITS = 5
SAMPLE_DIGITS = 4
MAX_SAMPLES_PER_SHARD = 10**SAMPLE_DIGITS
IMAGE_EXTENSIONS = ("jpg", "png", "webp")


@dataclass(frozen=True)
class Sample:
    """One encoded sample, ready to be written."""

    image: bytes
    caption: str
    image_ext: str = "jpg"
    meta: dict[str, Any] = field(default_factory=dict)


def shard_name(index: int) -> str:
    return f"{index:0{SHARD_DIGITS}d}"


def sample_key(shard_index: int, position: int) -> str:
    return f"{shard_index:0{SHARD_DIGITS}d}{position:0{SAMPLE_DIGITS}d}"


def tar_path(output_dir: Path, shard_index: int) -> Path:
    return output_dir / f"{shard_name(shard_index)}.tar"


def stats_path(output_dir: Path, shard_index: int) -> Path:
    return output_dir / f"{shard_name(shard_index)}_stats.json"


def is_complete(output_dir: Path, shard_index: int) -> bool:
    """A shard is complete once its ``_stats.json`` exists (it is written last)."""
    return stats_path(output_dir, shard_index).exists()


def read_stats(output_dir: Path, shard_index: int) -> dict[str, Any] | None:
    """The shard's ``_stats.json``, or None when it is absent or unreadable (incomplete)."""
    try:
        stats = json.loads(stats_path(output_dir, shard_index).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stats if isinstance(stats, dict) else None


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


class ShardWriter:
    """Stream samples into one shard; ``finish`` publishes tar, parquet, then ``_stats.json``.

    The tar is written under ``NNNNN.tar.tmp`` and renamed only when complete, so a build
    killed at any moment never leaves a file that looks finished but is not; a rebuild simply
    overwrites the temporary file. Used as a context manager, an exception removes it.
    """

    def __init__(self, output_dir: Path | str, shard_index: int) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.shard_index = shard_index
        self.rows: list[dict[str, Any]] = []
        self._final = tar_path(self.output_dir, shard_index)
        self._tmp = self._final.with_name(self._final.name + ".tmp")
        # Closed by finish() or abort(); the writer itself is the context manager.
        self._tar: tarfile.TarFile | None = tarfile.open(  # noqa: SIM115
            self._tmp, "w", format=tarfile.GNU_FORMAT
        )

    def add(self, sample: Sample) -> str:
        """Append one sample and return the key it was given."""
        if self._tar is None:
            raise RuntimeError("shard already finished")
        position = len(self.rows)
        if position >= MAX_SAMPLES_PER_SHARD:
            raise ValueError(f"a shard holds at most {MAX_SAMPLES_PER_SHARD} samples")
        if sample.image_ext not in IMAGE_EXTENSIONS:
            raise ValueError(f"image extension {sample.image_ext!r} not in {IMAGE_EXTENSIONS}")
        key = sample_key(self.shard_index, position)
        meta = {**sample.meta, "key": key, "caption": sample.caption, "status": "success"}
        _add_member(self._tar, f"{key}.{sample.image_ext}", sample.image)
        _add_member(self._tar, f"{key}.txt", sample.caption.encode("utf-8"))
        _add_member(self._tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
        self.rows.append(meta)
        return key

    def finish(self, extra_stats: dict[str, Any] | None = None) -> dict[str, Any]:
        """Publish the shard and return its stats (also written to ``_stats.json``)."""
        if self._tar is None:
            raise RuntimeError("shard already finished")
        self._tar.close()
        self._tar = None
        tar_bytes = self._tmp.stat().st_size
        os.replace(self._tmp, self._final)
        name = shard_name(self.shard_index)
        atomic_write_bytes(self.output_dir / f"{name}.parquet", _parquet_bytes(self.rows))
        stats = {
            "shard": name,
            "count": len(self.rows),
            "successes": len(self.rows),
            "tar_bytes": tar_bytes,  # lets a resume notice a shard damaged after it was built
            **(extra_stats or {}),
        }
        payload = json.dumps(stats, indent=2, sort_keys=True).encode("utf-8")
        atomic_write_bytes(stats_path(self.output_dir, self.shard_index), payload)
        return stats

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()


def write_shard(
    output_dir: Path | str,
    shard_index: int,
    samples: Iterable[Sample],
    extra_stats: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write one shard (tar, parquet, then ``_stats.json``) and return its stats."""
    with ShardWriter(output_dir, shard_index) as writer:
        for sample in samples:
            writer.add(sample)
        return writer.finish(extra_stats)


def _parquet_bytes(rows: list[dict[str, Any]]) -> bytes:
    """The metadata rows as parquet, with a schema that any mix of row values fits.

    Nested values are stored as JSON text so every shard has a flat schema, and a column whose
    rows disagree on type (an extra field that is a number in one manifest row and text in
    another) is stored as JSON text throughout, rather than failing the shard.
    """
    columns = sorted({name for row in rows for name in row})
    table = {}
    for name in columns:
        values = [_parquet_value(row.get(name)) for row in rows]
        kinds = {_kind(v) for v in values if v is not None}
        if len(kinds) > 1:
            values = [None if v is None else json.dumps(v, sort_keys=True) for v in values]
        table[name] = values
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(table) if rows else pa.table({}), sink)
    return sink.getvalue().to_pybytes()


def _kind(value: Any) -> type:
    # bool is an int subclass and int widens to float in arrow: treat numbers as one kind.
    return float if isinstance(value, int | float) and not isinstance(value, bool) else type(value)


def _parquet_value(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else value


def write_sizes(
    output_dir: Path | str, shard_indices: Iterable[int] | None = None
) -> dict[str, int]:
    """Write ``sizes.json`` from complete shards' ``_stats.json`` files.

    With ``shard_indices`` only those shards are listed (a build lists the shards it made, not
    leftovers of an earlier, larger build in the same folder); otherwise every complete shard.
    """
    output_dir = Path(output_dir)
    if shard_indices is None:
        stats_files = sorted(output_dir.glob("*_stats.json"))
    else:
        stats_files = [stats_path(output_dir, index) for index in shard_indices]
    sizes = {}
    for stats_file in stats_files:
        stats = json.loads(stats_file.read_text(encoding="utf-8"))
        sizes[f"{stats['shard']}.tar"] = int(stats["count"])
    save_sizes(output_dir, sizes)
    return sizes


def save_sizes(output_dir: Path | str, sizes: dict[str, int]) -> Path:
    """Write ``sizes.json`` (shard basename -> samples) atomically and return its path."""
    path = Path(output_dir) / "sizes.json"
    atomic_write_bytes(path, json.dumps(sizes, indent=2).encode())
    return path


def shard_pattern(output_dir: Path | str, num_shards: int) -> str:
    """Brace pattern naming every shard of a set, e.g. ``dir/{00000..00009}.tar``."""
    last = shard_name(num_shards - 1)
    if num_shards == 1:
        return str(Path(output_dir) / f"{last}.tar")
    return str(Path(output_dir) / f"{{{shard_name(0)}..{last}}}.tar")
