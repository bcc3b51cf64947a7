"""Check a shard set: sample counts, sizes.json and per-shard stats agree, every image decodes.

    python -m data_tools.inspect_shards shards/                 # every .tar in the folder
    python -m data_tools.inspect_shards 'shards/{00000..00009}.tar' --sample 0.1

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
from data_tools.shard_writer import save_sizes
from data_tools.sources.shards import IMAGE_FIELDS, ends_cleanly

PROG = "inspect"
_KEY_PATTERN = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


@dataclass
class ShardReport:
    path: str
    samples: int = 0
    decoded: int = 0
    problems: list[str] = field(default_factory=list)
    # What the shard's _stats.json says was written (None: no readable stats file).
    stats_samples: int | None = None
    # A downloader's own counts (img2dataset: attempted and failed_to_*), not problems.
    downloader: dict[str, int] = field(default_factory=dict)
    # The tar's sample keys, kept only until the side files are checked.
    keys: set[str] = field(default_factory=set, repr=False)


@dataclass
class SetReport:
    shards: list[ShardReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def problem_count(self) -> int:
        return len(self.problems) + sum(len(s.problems) for s in self.shards)

    def downloader_totals(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for shard in self.shards:
            for name, count in shard.downloader.items():
                totals[name] = totals.get(name, 0) + count
        return totals


def list_shards(spec: str) -> tuple[list[str], bool]:
    """Shard paths named by ``spec`` and whether it named a whole folder."""
    if os.path.isdir(spec):
        names = sorted((n for n in os.listdir(spec) if n.endswith(".tar")), key=os.fsencode)
        return [os.path.join(spec, n) for n in names], True
    return list(braceexpand.braceexpand(spec)), False


def inspect_set(spec: str, fraction: float = 1.0, seed: int = 0) -> SetReport:
    paths, whole_folder = list_shards(spec)
    report = SetReport()
    folders = sorted({os.path.dirname(p) for p in paths})
    with_stats = {f for f in folders if os.path.isdir(f or ".") and any(
        n.endswith("_stats.json") for n in os.listdir(f or "."))}
    for path in paths:
        if not os.path.isfile(path):
            report.problems.append(f"{path}: missing")
            continue
        shard = inspect_shard(path, fraction, seed)
        _check_side_files(shard, os.path.dirname(path) in with_stats)
        report.shards.append(shard)
    for folder in folders:
        _check_sizes(folder, report, whole_folder)
        report.warnings.extend(
            f"{os.path.join(folder, n)}: temporary file of an interrupted build"
            for n in sorted(os.listdir(folder or ".")) if n.endswith(".tmp")
        )
    if report.shards and not any(s.samples for s in report.shards):
        report.warnings.append("no shard holds a sample: training on this set cannot start")
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
    report.keys.add(key)
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


def _check_side_files(shard: ShardReport, folder_has_stats: bool) -> None:
    """The shard's ``_stats.json`` and ``.parquet`` (when present) must count what the tar holds.

    Written samples are ``successes`` in the stats (img2dataset's ``count`` is the number of
    download attempts) and the parquet rows whose ``status`` is ``success`` (img2dataset lists
    its failed downloads there too); those rows' keys must be the tar's keys.
    """
    base = shard.path.removesuffix(".tar")
    stats_file, parquet_file = Path(base + "_stats.json"), Path(base + ".parquet")
    if stats_file.exists():
        _check_stats(shard, stats_file)
    elif folder_has_stats:
        shard.problems.append(f"no {stats_file.name}: the shard was never completed")
    if parquet_file.exists():
        _check_parquet(shard, parquet_file)
    shard.keys = set()


def _check_stats(shard: ShardReport, stats_file: Path) -> None:
    try:
        stats = json.loads(stats_file.read_text(encoding="utf-8"))
        attempted = int(stats["count"])
        written = int(stats.get("successes", attempted))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        shard.problems.append(f"{stats_file.name} unreadable: {error}")
        return
    shard.stats_samples = written
    failures = {name: count for name, count in stats.items()
                if name.startswith("failed_to_") and isinstance(count, int)}
    if failures:
        shard.downloader = {"attempted": attempted, "written": written, **failures}
    if written != shard.samples:
        shard.problems.append(f"{stats_file.name} says {written} samples, tar has "
                              f"{shard.samples}")


def _check_parquet(shard: ShardReport, parquet_file: Path) -> None:
    try:
        table = pq.ParquetFile(parquet_file)
        names = set(table.schema_arrow.names)
        columns = table.read(columns=[c for c in ("key", "status") if c in names]).to_pydict()
        rows = table.metadata.num_rows
    except Exception as error:  # pyarrow raises its own types for a damaged file
        shard.problems.append(f"{parquet_file.name} unreadable: {error}")
        return
    statuses = columns.get("status", ["success"] * rows)
    success = [i for i, status in enumerate(statuses) if status == "success"]
    keys = {str(columns["key"][i]) for i in success} if "key" in columns else None
    counted = f"{rows} rows" if len(success) == rows else f"{len(success)} success rows"
    not_in_tar = sorted(keys - shard.keys) if keys is not None else []
    if len(success) != shard.samples:
        detail = f" (not in the tar: {', '.join(not_in_tar[:3])})" if not_in_tar else ""
        shard.problems.append(f"{parquet_file.name} has {counted}, tar has {shard.samples} "
                              f"samples{detail}")
    elif not_in_tar:
        shard.problems.append(f"{parquet_file.name} has success rows whose samples are not in "
                              f"the tar, e.g. key {not_in_tar[0]}")


def _check_sizes(folder: str, report: SetReport, whole_folder: bool) -> None:
    sizes_file = os.path.join(folder, "sizes.json")
    if not os.path.exists(sizes_file):
        in_folder = [s for s in report.shards if os.path.dirname(s.path) == folder]
        if in_folder and all(s.stats_samples is not None for s in in_folder):
            report.notes.append(f"{sizes_file}: absent; the loader counts samples from the "
                                "shards' _stats.json (--write-sizes writes it)")
        else:
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
            downloader = f" ({_downloader_text(shard.downloader)})" if shard.downloader else ""
            lines.append(f"{shard.path}: {shard.samples} samples, {shard.decoded} images "
                         f"decoded, {status}{downloader}")
        lines.extend(f"  {problem}" for problem in shard.problems)
    lines.extend(f"problem: {problem}" for problem in report.problems)
    lines.extend(f"warning: {warning}" for warning in report.warnings)
    lines.extend(f"note: {note}" for note in report.notes)
    totals = report.downloader_totals()
    if totals:
        lines.append(f"downloader (img2dataset _stats.json): {_downloader_text(totals)}")
    samples = sum(s.samples for s in report.shards)
    decoded = sum(s.decoded for s in report.shards)
    lines.append(f"{len(report.shards)} shards, {samples} samples, {decoded} images decoded, "
                 f"{report.problem_count} problems")
    return "\n".join(lines)


def _downloader_text(counts: dict[str, int]) -> str:
    failures = ", ".join(f"{name} {count}" for name, count in counts.items()
                         if name not in ("attempted", "written") and count)
    text = f"{counts['attempted']} attempted, {counts['written']} written"
    return f"{text}; {failures}" if failures else text


def write_sizes_files(report: SetReport) -> list[Path]:
    """Write ``sizes.json`` beside the inspected shards from the counts in their tars, merged
    with the entries already there; atomically. Only for a report without problems."""
    if report.problem_count:
        raise ValueError(f"sizes.json not written: the set has {report.problem_count} problems")
    written = []
    for folder in sorted({os.path.dirname(s.path) for s in report.shards}):
        sizes_file = Path(folder or ".") / "sizes.json"
        sizes = json.loads(sizes_file.read_text(encoding="utf-8")) if sizes_file.exists() else {}
        sizes.update({os.path.basename(s.path): s.samples for s in report.shards
                      if os.path.dirname(s.path) == folder})
        written.append(save_sizes(folder or ".", dict(sorted(sizes.items()))))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("shards", metavar="DIR_OR_PATTERN",
                        help="a folder of shards, a tar, or a brace pattern")
    parser.add_argument("--sample", type=float, default=1.0, metavar="FRACTION",
                        help="decode only this fraction of the images (chosen by key)")
    parser.add_argument("--seed", type=int, default=0, help="changes which images --sample picks")
    parser.add_argument("--quiet", action="store_true", help="print only problems and the summary")
    parser.add_argument("--write-sizes", action="store_true",
                        help="write sizes.json from the tars' sample counts (a set without "
                             "problems only, e.g. one img2dataset wrote)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.sample <= 1.0:
        parser.error("--sample must be between 0 and 1")
    paths, _ = list_shards(args.shards)
    if not any(os.path.isfile(p) for p in paths):
        fail(PROG, f"no shards found at {args.shards}")
    report = inspect_set(args.shards, args.sample, args.seed)
    print(format_report(report, verbose=not args.quiet))
    if args.write_sizes:
        if report.problem_count:
            print(f"sizes.json not written: fix the {report.problem_count} problems first")
        else:
            for path in write_sizes_files(report):
                print(f"wrote {path}")
    return 1 if report.problem_count else 0


if __name__ == "__main__":
    sys.exit(main())
