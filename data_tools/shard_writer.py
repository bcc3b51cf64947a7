"""Write samples into WebDataset tar shards in img2dataset's layout.

Layout (see DESIGN.md): ``00000.tar, 00001.tar, ...``; 9-digit sample keys (5 digits of shard
index, 4 of position inside the shard); per sample ``.jpg``/``.png``/``.webp``, ``.txt`` and
``.json``; per shard a ``.parquet`` of the metadata and a ``_stats.json`` written last, whose
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
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

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


def stats_path(output_dir: Path, shard_index: int) -> Path:
    return output_dir / f"{shard_name(shard_index)}_stats.json"


def is_complete(output_dir: Path, shard_index: int) -> bool:
    """A shard is complete once its ``_stats.json`` exists (it is written last)."""
    return stats_path(output_dir, shard_index).exists()


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def write_shard(
    output_dir: Path | str,
    shard_index: int,
    samples: Iterable[Sample],
    extra_stats: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write one shard (tar, parquet, then ``_stats.json``) and return its stats.

    Every file goes to a temporary name first and is renamed when complete, so a build killed
    at any moment never leaves a file that looks finished but is not.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    name = shard_name(shard_index)
    tar_path = output_dir / f"{name}.tar"
    tmp_tar = tar_path.with_name(tar_path.name + ".tmp")
    rows: list[dict[str, Any]] = []
    with tarfile.open(tmp_tar, "w", format=tarfile.GNU_FORMAT) as tar:
        for position, sample in enumerate(samples):
            if position >= MAX_SAMPLES_PER_SHARD:
                raise ValueError(f"a shard holds at most {MAX_SAMPLES_PER_SHARD} samples")
            if sample.image_ext not in IMAGE_EXTENSIONS:
                raise ValueError(f"image extension {sample.image_ext!r} not in {IMAGE_EXTENSIONS}")
            key = sample_key(shard_index, position)
            meta = {"key": key, "caption": sample.caption, "status": "success", **sample.meta}
            _add_member(tar, f"{key}.{sample.image_ext}", sample.image)
            _add_member(tar, f"{key}.txt", sample.caption.encode("utf-8"))
            _add_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
            rows.append(meta)
    os.replace(tmp_tar, tar_path)

    table = pa.Table.from_pylist([{k: _parquet_value(v) for k, v in r.items()} for r in rows])
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    _atomic_write_bytes(output_dir / f"{name}.parquet", sink.getvalue().to_pybytes())

    stats = {"shard": name, "count": len(rows), "successes": len(rows), **(extra_stats or {})}
    _atomic_write_bytes(stats_path(output_dir, shard_index), json.dumps(stats, indent=2).encode())
    return stats


def _parquet_value(value: Any) -> Any:
    """Nested metadata goes to parquet as JSON text so every shard has a flat schema."""
    return json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else value


def write_sizes(output_dir: Path | str) -> dict[str, int]:
    """Write ``sizes.json`` from the complete shards' ``_stats.json`` files."""
    output_dir = Path(output_dir)
    sizes = {}
    for stats_file in sorted(output_dir.glob("*_stats.json")):
        stats = json.loads(stats_file.read_text())
        sizes[f"{stats['shard']}.tar"] = int(stats["count"])
    _atomic_write_bytes(output_dir / "sizes.json", json.dumps(sizes, indent=2).encode())
    return sizes


def shard_pattern(output_dir: Path | str, num_shards: int) -> str:
    """Brace pattern naming every shard of a set, e.g. ``dir/{00000..00009}.tar``."""
    last = shard_name(num_shards - 1)
    if num_shards == 1:
        return str(Path(output_dir) / f"{last}.tar")
    return str(Path(output_dir) / f"{{{shard_name(0)}..{last}}}.tar")
