"""Check a shard set: sample counts, sizes.json and per-shard stats agree, every image decodes.

    python -m data_tools.inspect shards/                 # every .tar in the folder
    python -m data_tools.inspect 'shards/{00000..00009}.tar' --sample 0.1

For each shard: the tar is read to the end (a truncated tar is caught even when it ends exactly
between two members, by its missing end-of-archive blocks); samples are grouped by key as
webdataset does; each must have an image and a UTF-8 caption, its .json must parse, and its
image must decode (all of them, or a deterministic ``--sample`` fraction). The counts must
match ``sizes.json``, the shard's ``_stats.json`` and its ``.parquet`` when those exist. Prints
one line per shard and a summary; exits 1 when any shard is corrupt or inconsistent.

This reads tars with ``tarfile`` rather than webdataset on purpose: it checks the container
itself, which a streaming reader is built to tolerate.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import tarfile
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand
import pyarrow.parquet as pq
from PIL import Image

from data_tools.cli import OneLineParser, fail
from data_tools.images import SAFE_FORMATS
from data_tools.sources.shards import IMAGE_FIELDS, ends_cleanly

PROG = "inspect"
_KEY_PATTERN = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


@dataclass
class ShardReport:
    path: str
    samples: int = 0
    decoded: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class SetReport:
    shards: list[ShardReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def problem_count(self) -> int:
        return len(self.problems) + sum(len(s.problems) for s in self.shards)


def list_shards(spec: str) -> tuple[list[str], bool]:
    """Shard paths named by ``spec`` and whether it named a whole folder."""
    if os.path.isdir(spec):
        names = sorted((n for n in os.listdir(spec) if n.endswith(".tar")), key=os.fsencode)
        return [os.path.join(spec, n) for n in names], True
    return list(braceexpand.braceexpand(spec)), False


def inspect_set(spec: str, fraction: float = 1.0, seed: int = 0) -> SetReport:
    paths, whole_folder = list_shards(spec)
    report = SetReport()
    for path in paths:
        if not os.path.isfile(path):
            report.problems.append(f"{path}: missing")
            continue
        shard = inspect_shard(path, fraction, seed)
        _check_side_files(shard)
        report.shards.append(shard)
    folders = sorted({os.path.dirname(p) for p in paths}) if paths else []
    for folder in folders:
        _check_sizes(folder, report, whole_folder)
        report.warnings.extend(
            f"{os.path.join(folder, n)}: temporary file of an interrupted build"
            for n in sorted(os.listdir(folder or ".")) if n.endswith(".tmp")
        )
    return report


def inspect_shard(path: str, fraction: float = 1.0, seed: int = 0) -> ShardReport:
    report = ShardReport(path)
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            _read_samples(tar, report, fraction, seed)
            complete = ends_cleanly(handle, tar.offset)
    except (OSError, EOFError, tarfile.TarError) as error:
        report.problems.append(f"unreadable tar: {error}")
        return report
    if not complete:
        report.problems.append(f"truncated or corrupt: no end-of-archive marker after the last "
                               f"readable member (file ends at byte {size})")
    return report


def _read_samples(tar: tarfile.TarFile, report: ShardReport, fraction: float, seed: int) -> None:
    prefix, group, keys = None, {}, set()
    for member in tar:
        match = _KEY_PATTERN.match(member.name)
        if not member.isfile() or match is None:
            continue
        key, field = match.group(1), match.group(2).lower()
        if key != prefix or field in group:  # a field seen again: the key repeats
            if group:
                _check_sample(tar, prefix, group, report, fraction, seed)
            if key in keys:
                report.problems.append(f"duplicate key: {key} appears twice (a reader keeps "
                                       "one of them, or merges them)")
            prefix, group = key, {}
            keys.add(prefix)
        group[field] = member
    if group:
        _check_sample(tar, prefix, group, report, fraction, seed)


def _check_sample(tar: tarfile.TarFile, key: str, group: dict[str, tarfile.TarInfo],
                  report: ShardReport, fraction: float, seed: int) -> None:
    report.samples += 1
    image_field = next((f for f in IMAGE_FIELDS if f in group), None)
    if image_field is None:
        report.problems.append(f"sample {key}: no image")
    if "txt" not in group:
        report.problems.append(f"sample {key}: no caption")
    else:
        try:
            _member_bytes(tar, group["txt"]).decode("utf-8")
        except UnicodeDecodeError:
            report.problems.append(f"sample {key}: caption is not UTF-8")
    if "json" in group:
        try:
            json.loads(_member_bytes(tar, group["json"]))
        except ValueError:
            report.problems.append(f"sample {key}: .json does not parse")
    if image_field is not None and _selected(key, fraction, seed):
        problem = _decode_problem(_member_bytes(tar, group[image_field]))
        report.decoded += 1
        if problem:
            report.problems.append(f"sample {key}: image does not decode ({problem})")


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(member)
    return handle.read() if handle is not None else b""


def _selected(key: str, fraction: float, seed: int) -> bool:
    return fraction >= 1.0 or zlib.crc32(f"{seed}:{key}".encode()) < fraction * 2**32


def _decode_problem(data: bytes) -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=SAFE_FORMATS) as image:
                image.load()
    except Exception as error:  # every decoder failure is a finding, not a crash
        return f"{type(error).__name__}: {error}"
    return None


def _check_side_files(shard: ShardReport) -> None:
    """The shard's ``_stats.json`` and ``.parquet`` (when present) must count what the tar holds."""
    base = shard.path.removesuffix(".tar")
    stats_file, parquet_file = Path(base + "_stats.json"), Path(base + ".parquet")
    if stats_file.exists():
        try:
            count = int(json.loads(stats_file.read_text(encoding="utf-8"))["count"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            shard.problems.append(f"{stats_file.name} unreadable: {error}")
        else:
            if count != shard.samples:
                shard.problems.append(f"{stats_file.name} says {count} samples, tar has "
                                      f"{shard.samples}")
    elif any(stats_file.parent.glob("*_stats.json")):
        shard.problems.append(f"no {stats_file.name}: the shard was never completed")
    if parquet_file.exists():
        try:
            rows = pq.ParquetFile(parquet_file).metadata.num_rows
        except Exception as error:  # pyarrow raises its own types for a damaged file
            shard.problems.append(f"{parquet_file.name} unreadable: {error}")
        else:
            if rows != shard.samples:
                shard.problems.append(f"{parquet_file.name} has {rows} rows, tar has "
                                      f"{shard.samples} samples")


def _check_sizes(folder: str, report: SetReport, whole_folder: bool) -> None:
    sizes_file = os.path.join(folder, "sizes.json")
    if not os.path.exists(sizes_file):
        report.warnings.append(f"{sizes_file}: absent, sample counts not cross-checked")
        return
    try:
        sizes = json.loads(Path(sizes_file).read_text(encoding="utf-8"))
        sizes = {str(name): int(count) for name, count in sizes.items()}
    except (OSError, ValueError, AttributeError, TypeError) as error:
        report.problems.append(f"{sizes_file}: unreadable ({error})")
        return
    shards = {os.path.basename(s.path): s for s in report.shards
              if os.path.dirname(s.path) == folder}
    for name, shard in shards.items():
        if name not in sizes:
            shard.problems.append("not listed in sizes.json")
        elif sizes[name] != shard.samples:
            shard.problems.append(f"sizes.json says {sizes[name]} samples, tar has "
                                  f"{shard.samples}")
    if whole_folder:
        for name in sorted(set(sizes) - set(shards)):
            report.problems.append(f"{sizes_file}: lists {name}, which does not exist")


def format_report(report: SetReport, verbose: bool = True) -> str:
    lines = []
    for shard in report.shards:
        status = "OK" if not shard.problems else f"{len(shard.problems)} problem(s)"
        if verbose or shard.problems:
            lines.append(f"{shard.path}: {shard.samples} samples, {shard.decoded} images "
                         f"decoded, {status}")
        lines.extend(f"  {problem}" for problem in shard.problems)
    lines.extend(f"problem: {problem}" for problem in report.problems)
    lines.extend(f"warning: {warning}" for warning in report.warnings)
    samples = sum(s.samples for s in report.shards)
    decoded = sum(s.decoded for s in report.shards)
    lines.append(f"{len(report.shards)} shards, {samples} samples, {decoded} images decoded, "
                 f"{report.problem_count} problems")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("shards", metavar="DIR_OR_PATTERN",
                        help="a folder of shards, a tar, or a brace pattern")
    parser.add_argument("--sample", type=float, default=1.0, metavar="FRACTION",
                        help="decode only this fraction of the images (chosen by key)")
    parser.add_argument("--seed", type=int, default=0, help="changes which images --sample picks")
    parser.add_argument("--quiet", action="store_true", help="print only problems and the summary")
    args = parser.parse_args(argv)
    if not 0.0 <= args.sample <= 1.0:
        parser.error("--sample must be between 0 and 1")
    paths, _ = list_shards(args.shards)
    if not any(os.path.isfile(p) for p in paths):
        fail(PROG, f"no shards found at {args.shards}")
    report = inspect_set(args.shards, args.sample, args.seed)
    print(format_report(report, verbose=not args.quiet))
    return 1 if report.problem_count else 0


if __name__ == "__main__":
    sys.exit(main())
