"""Shard sets as img2dataset writes them: inspect, the loader's sample counts, --check and
re-sharding understand them.

img2dataset's webdataset output, per shard: ``00000.tar`` holding only the successful downloads
(``KEY.jpg``, ``KEY.json``, ``KEY.txt``, members in that order), ``00000.parquet`` with one row
per input row, failures included (``status`` ``failed_to_download`` / ``failed_to_resize``, with
an ``error_message``), and ``00000_stats.json`` whose ``count`` is the number of attempts. It
writes no ``sizes.json``. Keys are assigned per input row, so a failure leaves a gap.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data_helpers import build, gradient_jpeg, read_samples

from data_tools.mixture import shard_set

ROOT = Path(__file__).resolve().parents[1]
# Per shard, the fate of each input row in order: "success" or the failure status.
ROWS = [["success", "failed_to_download", "success", "failed_to_resize"],
        ["success", "success", "success"]]
ERRORS = {"failed_to_download": "<urlopen error [Errno -2] Name or service not known>",
          "failed_to_resize": "image decoding error"}


def _row(shard: int, index: int, status: str) -> tuple[dict, bytes | None]:
    key = f"{shard:05d}{index:04d}"
    url = f"https://images.example.com/{shard}/{index}.jpg"
    row = {"url": url, "caption": f"photo {shard}-{index}  of a thing", "key": key,
           "status": status, "error_message": ERRORS.get(status), "width": None,
           "height": None, "original_width": None, "original_height": None, "exif": None,
           "sha256": None}
    if status != "success":
        return row, None
    image = gradient_jpeg((32, 24), seed=shard * 10 + index)
    row.update(width=32, height=24, original_width=640, original_height=480, exif="{}",
               sha256=hashlib.sha256(f"downloaded {url}".encode()).hexdigest())
    return row, image


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 1_700_000_000, 0o444
    info.uname = info.gname = "bigdata"
    tar.addfile(info, io.BytesIO(payload))


def write_img2dataset_set(folder: Path, rows: list[list[str]] = ROWS) -> Path:
    folder.mkdir(parents=True)
    for shard, statuses in enumerate(rows):
        rows = []
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for index, status in enumerate(statuses):
                row, image = _row(shard, index, status)
                rows.append(row)
                if image is not None:
                    _add(tar, f"{row['key']}.jpg", image)
                    _add(tar, f"{row['key']}.json", json.dumps(row).encode())
                    _add(tar, f"{row['key']}.txt", row["caption"].encode())
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{shard:05d}.parquet")
        failures = {name: statuses.count(name) for name in ERRORS}
        stats = {"count": len(statuses), "successes": statuses.count("success"), **failures,
                 "duration": 1.25, "start_time": 1_700_000_000.0, "end_time": 1_700_000_001.25,
                 "status_dict": {"success": statuses.count("success"),
                                 **{ERRORS[k]: v for k, v in failures.items() if v}}}
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps(stats, indent=4))
    return folder


@pytest.fixture
def downloaded(tmp_path: Path) -> Path:
    return write_img2dataset_set(tmp_path / "laion")


def inspect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_tools.inspect_shards", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_inspect_counts_successes_and_reports_download_failures_as_counts(
        downloaded: Path) -> None:
    result = inspect(str(downloaded))
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    assert (f"{downloaded}/00000.tar: 2 samples, 2 images decoded, OK (4 attempted, 2 written; "
            "failed_to_download 1, failed_to_resize 1)") in lines
    assert not [line for line in lines if line.startswith(("warning:", "problem:"))]
    assert any(line.startswith("note: ") and "sizes.json: absent" in line for line in lines)
    assert ("downloader (img2dataset _stats.json): 7 attempted, 5 written; "
            "failed_to_download 1, failed_to_resize 1") in lines
    assert lines[-1] == "2 shards, 5 samples, 5 images decoded, 0 problems"


def _drop_member_sample(tar_file: Path, key: str) -> None:
    with tarfile.open(tar_file) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tar_file, "w") as tar:
        for member, payload in members:
            if not member.name.startswith(key):
                tar.addfile(member, io.BytesIO(payload))


def test_inspect_still_fails_a_shard_that_lost_a_sample_or_was_truncated(
        downloaded: Path) -> None:
    _drop_member_sample(downloaded / "00001.tar", "000010001")
    result = inspect(str(downloaded), "--quiet")
    assert result.returncode == 1
    assert result.stdout.splitlines()[:3] == [
        f"{downloaded}/00001.tar: 2 samples, 2 images decoded, 2 problem(s) (3 attempted, "
        "3 written)",
        "  00001_stats.json says 3 samples, tar has 2",
        "  00001.parquet has 3 rows, tar has 2 samples (not in the tar: 000010001)",
    ]
    with tarfile.open(downloaded / "00000.tar") as tar:
        second_image = [m for m in tar.getmembers() if m.name.endswith(".jpg")][1]
    os.truncate(downloaded / "00000.tar", second_image.offset_data + 100)
    result = inspect(str(downloaded), "--quiet")
    assert result.returncode == 1
    assert f"{downloaded}/00000.tar: 1 samples" in result.stdout
    assert "00000.parquet has 2 success rows, tar has 1 samples (not in the tar: 000000002)" \
        in result.stdout


def test_a_success_row_without_its_sample_is_a_problem_even_when_counts_agree(
        downloaded: Path) -> None:
    _drop_member_sample(downloaded / "00001.tar", "000010001")
    stats_file = downloaded / "00001_stats.json"
    stats_file.write_text(json.dumps({**json.loads(stats_file.read_text()), "successes": 2}))
    with tarfile.open(downloaded / "00001.tar", "a") as tar:  # a sample the parquet lacks
        _add(tar, "000019999.jpg", gradient_jpeg((8, 8)))
        _add(tar, "000019999.txt", b"not downloaded")
    result = inspect(str(downloaded), "--quiet")
    assert result.returncode == 1
    assert ("00001.parquet has success rows whose samples are not in the tar, e.g. key "
            "000010001") in result.stdout


def test_loader_counts_samples_from_stats_and_write_sizes_records_them(
        downloaded: Path) -> None:
    pattern = str(downloaded / "{00000..00001}.tar")
    assert shard_set(pattern).sizes == (2, 3)  # successes, not download attempts
    result = inspect(str(downloaded), "--write-sizes")
    assert result.returncode == 0
    assert f"wrote {downloaded}/sizes.json" in result.stdout
    assert json.loads((downloaded / "sizes.json").read_text()) == {"00000.tar": 2,
                                                                   "00001.tar": 3}
    assert not list(downloaded.glob("*.tmp"))
    assert shard_set(pattern).sizes == (2, 3)
    result = inspect(str(downloaded))
    assert result.returncode == 0 and "note:" not in result.stdout


def test_write_sizes_refuses_a_damaged_set(downloaded: Path) -> None:
    _drop_member_sample(downloaded / "00001.tar", "000010001")
    result = inspect(str(downloaded), "--write-sizes")
    assert result.returncode == 1
    assert "sizes.json not written: fix the 2 problems first" in result.stdout
    assert not (downloaded / "sizes.json").exists()


def test_pretrain_check_accepts_an_img2dataset_set(tmp_path: Path) -> None:
    """Even with a shard whose every download failed (a tar without members, 0 successes)."""
    downloaded = write_img2dataset_set(tmp_path / "laion", [*ROWS, ["failed_to_download"] * 2])
    pattern = f"{downloaded}/{{00000..00002}}.tar"
    assert shard_set(pattern).sizes == (2, 3, 0)
    result = subprocess.run(
        [sys.executable, "launch/pretrain.py", "--check", "--config", "demo",
         "--set", f"data.train={pattern}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert pattern in result.stdout


def test_resharding_keeps_img2dataset_metadata(downloaded: Path, tmp_path: Path) -> None:
    out = tmp_path / "resharded"
    summary = build(["--input", str(downloaded), "--output", str(out), "--image-size", "16"])
    assert summary["samples"] == 5 and summary["skipped"] == {}
    first = read_samples(out)[0]["json"]
    original, _ = _row(0, 0, "success")
    assert first["url"] == first["source_id"] == original["url"]
    assert first["source_key"] == "000000000" and first["key"] == "000000000"
    assert (first["original_width"], first["original_height"]) == (640, 480)  # the download's
    assert (first["source_width"], first["source_height"]) == (32, 24)  # img2dataset's output
    assert (first["width"], first["height"]) == (21, 16)
    assert first["source_sha256"] == original["sha256"]  # img2dataset's hash of the download
    assert first["source_caption"] == original["caption"]  # cleaned caption differs
    assert first["caption"] == "photo 0-0 of a thing" and first["exif"] == "{}"
    table = pq.read_table(out / "00000.parquet").to_pydict()
    assert table["url"][:2] == [original["url"], _row(0, 2, "success")[0]["url"]]
    assert table["source_key"][:2] == ["000000000", "000000002"]
